"""int8 / int4 base weights (serve --weights) against bf16: accuracy and speed, in one process.

    .venv/bin/python -m bench.quant_weights      # -> bench/results/quant_weights.json

SmolLM2-135M (the default model), bf16 activations, 2 threads, the CPU backend as it serves.
Accuracy, teacher-forced: bf16 generates --tokens greedy tokens for each of the workload's 32
chat prompts (bench.common.workload()); each model then runs prompt + those tokens as one
prefill, and at each of the --tokens positions we compare its logits with bf16's: greedy
agreement (its argmax is bf16's), mean and max |logit difference|, and KL(bf16 || it) of the
softmaxes. Teacher forcing keeps one early divergence from counting at every later position.
Speed, interleaved rounds (each round runs every engine in turn; medians reported): one
request alone (the first workload prompt, --tokens new tokens; decode tok/s counts the steps
after the prefill), the 32-request workload at once, and the same 32 requests spread over 8
q,v LoRAs (r 8) against the same engine's base. `uptime` is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import environment, workload
from bench.single_stream import chat_prompt, one_request
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.layers.attention import AttentionMetadata, PrefillChunk
from peftserve.models.llama import StepContext
from peftserve.models.loader import resolve_model_dir

KINDS = ("bf16", "int8", "int4")


@torch.inference_mode()
def prefill_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    # ids: [n] -> [n, vocab] fp32, every position's next-token logits (one prefill)
    model, n = engine.model, len(ids)
    h = model.embed_tokens(torch.tensor(ids))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), num_decodes=0, block_size=engine.config.block_size,
        decode_blocks=None, decode_mask=None, decode_lens=None,
        prefills=(PrefillChunk(0, n, None, None),),
    )  # fmt: skip
    cos, sin = model.rotary.cos_sin(torch.arange(n), model.dtype)
    out = model(h, engine.runner.kv_cache, StepContext(attn=meta, cos=cos, sin=sin))
    return model.logits(out)


def accuracy(engines: dict[str, Engine], tokens: int, n_prompts: int) -> dict:
    ref = engines["bf16"]
    prompts = [chat_prompt(ref, msg) for msg, _ in workload()[:n_prompts]]
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    reqs = [Request(f"a{i}", prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
    gen = {rid: [t for o in outs for t in o.token_ids] for rid, outs in ref.generate(reqs).items()}
    stats: dict[str, dict[str, list[float]]] = {k: {"agree": [], "abs": [], "max": [], "kl": []}
                                                for k in engines if k != "bf16"}  # fmt: skip
    for i, p in enumerate(prompts):
        ids = list(p) + gen[f"a{i}"]
        rows = slice(len(p) - 1, len(ids) - 1)  # the positions that predict the new tokens
        base = prefill_logits(ref, ids)[rows].double()
        logp = torch.log_softmax(base, -1)
        print(f"accuracy: prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
        for kind, s in stats.items():
            q = prefill_logits(engines[kind], ids)[rows].double()
            s["agree"] += (q.argmax(-1) == base.argmax(-1)).double().tolist()
            d = (q - base).abs()
            s["abs"] += d.mean(-1).tolist()
            s["max"] += d.amax(-1).tolist()
            s["kl"] += (logp.exp() * (logp - torch.log_softmax(q, -1))).sum(-1).tolist()
    return {
        kind: {
            "positions": len(s["agree"]),
            "greedy_agreement": statistics.fmean(s["agree"]),
            "mean_abs_logit_diff": statistics.fmean(s["abs"]),
            "max_abs_logit_diff": max(s["max"]),
            "mean_kl": statistics.fmean(s["kl"]),
            "max_kl": max(s["kl"]),
        }
        for kind, s in stats.items()
    }


def batch_s(engine: Engine, prompts: list[tuple[int, ...]], lengths: list[int],
            adapters: list[str | None]) -> float:  # fmt: skip
    items = zip(prompts, lengths, adapters, strict=True)
    reqs = [Request(f"b{i}", prompt_token_ids=p, adapter=a,
                    params=SamplingParams(max_new_tokens=n, ignore_eos=True))
            for i, (p, n, a) in enumerate(items)]  # fmt: skip
    t0 = time.perf_counter()
    engine.generate(reqs)
    return time.perf_counter() - t0


def speed(engines: dict[str, Engine], loras: list[str], tokens: int, rounds: int) -> dict:
    ref = next(iter(engines.values()))
    load = workload()
    prompts, lengths = [chat_prompt(ref, m) for m, _ in load], [n for _, n in load]
    one = chat_prompt(ref)
    spread = [loras[i % len(loras)] for i in range(len(prompts))]
    runs: dict[str, dict[str, list[float]]] = {
        k: {"single_tok_s": [], "single_decode_tok_s": [], "batch32_tok_s": [],
            "lora8_tok_s": [], "lora8_over_base": []}
        for k in engines
    }  # fmt: skip
    for e in engines.values():  # warm-up
        one_request(e, one, 4, "w")
        batch_s(e, prompts[:4], [4] * 4, spread[:4])
    for r in range(rounds):
        for kind, e in engines.items():
            s = one_request(e, one, tokens, f"s{r}")
            runs[kind]["single_tok_s"].append(tokens / s["total_s"])
            runs[kind]["single_decode_tok_s"].append(s["decode_steps"] / s["decode_s"])
        for kind, e in engines.items():
            base = sum(lengths) / batch_s(e, prompts, lengths, [None] * len(prompts))
            lora = sum(lengths) / batch_s(e, prompts, lengths, spread)
            runs[kind]["batch32_tok_s"].append(base)
            runs[kind]["lora8_tok_s"].append(lora)
            runs[kind]["lora8_over_base"].append(lora / base)
    out = {k: {name: statistics.median(v) for name, v in m.items()} for k, m in runs.items()}
    for kind in engines:
        out[kind]["rounds"] = runs[kind]
        if kind != "bf16" and "bf16" in runs:
            for name in ("single_tok_s", "single_decode_tok_s", "batch32_tok_s"):
                ratios = [a / b for a, b in zip(runs[kind][name], runs["bf16"][name], strict=True)]
                out[kind][f"{name}_over_bf16"] = statistics.median(ratios)
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=",".join(KINDS), help="comma-separated; bf16 first")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per accuracy prompt and "
                    "for the single stream")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=32, help="accuracy prompts (of the 32)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", default="bench/results/quant_weights.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.weights.split(",")
    assert kinds[0] == "bf16", "bf16 first: the reference"
    before = uptime()
    print(f"loading {kinds}", file=sys.stderr, flush=True)
    engines = {k: Engine.from_config(EngineConfig(model="default", dtype="bfloat16", weights=k,
                                                  max_num_seqs=64, kv_cache_bytes=512 << 20))
               for k in kinds}  # fmt: skip
    result: dict = {"command": " ".join([sys.executable.split("/")[-1], "-m", "bench.quant_weights",
                                         *sys.argv[1:]]),
                    "environment": environment(), "uptime_before": before,
                    "lm_head": {k: str(engines[k].model.lm_head_gemv.dtype) for k in kinds}}
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(engines, args.tokens, args.prompts)
        print(json.dumps(result["accuracy"], indent=1), flush=True)
    if not args.skip_speed:
        from tests.adapters import make_lora

        with tempfile.TemporaryDirectory() as tmp:
            model_dir = resolve_model_dir("default")
            names = [f"qv{i}" for i in range(8)]
            for i, name in enumerate(names):
                path = make_lora(model_dir, Path(tmp) / name, r=8, seed=i)
                for e in engines.values():
                    e.adapters.register(name, path)
            result["speed"] = speed(engines, names, args.tokens * 2, args.rounds)
    result["uptime_after"] = uptime()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {n: v for n, v in m.items() if n != "rounds"}
                      for k, m in result.get("speed", {}).items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
