"""A Llama-family model directory of a named shape with seeded random bf16 weights, generated on
the GPU and written as safetensors shards plus their index (what `save_pretrained` writes), in
seconds: the benchmark's stand-in for weights that cannot travel to the GPU machine.

    python -m bench.random_weights --shape llama-3.1-8b --tokenizer-dir DIR [--out /dev/shm/x]

The tokenizer is SmolLM2's (from DIR): its ids (< 49,152) are in range for both shapes. With
EOS ignored every request produces exactly its planned tokens, so throughput does not depend on
the weights' values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

SHAPES: dict[str, dict] = {
    "smollm2": dict(  # SmolLM2-135M
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "tiny": dict(  # the CPU dry run of bench.gpu_engine (tests/unit/test_gpu_engine_bench.py)
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
}  # fmt: skip
SHARD_BYTES = 4 << 30
STD = 0.02  # transformers' initializer_range for Llama


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }  # fmt: skip
    out["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def write_model(
    shape: str, tokenizer_dir: Path, out: Path, seed: int = 0, device: str = "cuda"
) -> dict:
    """Writes the model directory; returns what it did (for the benchmark's JSON). `device`:
    where the weights are generated (cpu: a dry run of the script)."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    c = SHAPES[shape]
    LlamaConfig(**c, rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                ).save_pretrained(out)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    n_params = 0
    for name, dims in tensor_shapes(c).items():
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.bfloat16, device=device)
        else:
            t = torch.randn(dims, generator=g, device=device, dtype=torch.bfloat16).mul_(STD)
        if size + t.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += t.nbytes
        n_params += t.numel()
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"shape": shape, "params": n_params, "shards": len(shards), "dir": str(out),
            "seconds": time.perf_counter() - t0, "seed": seed}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path("/dev/shm") / f"peftserve-{args.shape}"
    print(json.dumps(write_model(args.shape, args.tokenizer_dir, out)))


if __name__ == "__main__":
    main()
