"""Engine throughput and decode-step floor on SmolLM2, against transformers in the same run.

    .venv/bin/python -m bench.engine_throughput            # fp32 and bf16, 2 threads
    .venv/bin/python -m bench.engine_throughput --dtypes float32 --threads 2

Workload: 32 chat requests given at once, output lengths uniform in 16..128 (seed 0), greedy,
EOS ignored so every configuration produces exactly the same useful tokens. Compared with
transformers `generate` on the same weights and dtype: all 32 in one left-padded batch (its
strongest setting here; it runs until the longest request is done) and in batches of 8, in
--rounds interleaved rounds (median times; speedups are medians of the per-round ratios).
The floor: one plain matmul pass (F.linear) over the same weight tensors at batch 1/8/32, timed
in the same run, against our decode step at the same batch size; in CPU half precision also the
same pass on the oneDNN-packed weights the engine runs (the stricter floor).
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.common import (
    decode_step_vs_floor,
    environment,
    matmul_floors,
    median_time,
    timed,
    workload,
)
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.models.loader import resolve_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def chat_ids(tokenizer, message: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]


def run_engine(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> None:
    reqs = [
        Request(
            f"r{i}",
            prompt_token_ids=tuple(p),
            params=SamplingParams(max_new_tokens=n, ignore_eos=True),
        )
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    results = engine.generate(reqs)
    got = sum(outs[-1].completion_tokens for outs in results.values())
    assert got == sum(lengths), (got, sum(lengths))


def run_hf(model, tokenizer, prompts: list[list[int]], lengths: list[int], batch: int) -> None:
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(lengths[i : i + batch]),
                min_new_tokens=max(lengths[i : i + batch]),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
            )


def matmul_pass(engine: Engine, batch: int, sync: Callable[[], None] = lambda: None) -> float:
    """The plain matmul floor's pass (bench.common.matmul_floors): median of 9 (21 on a GPU,
    whose passes are short)."""
    once = matmul_floors(engine.model, batch)["plain"]
    once()
    return median_time(once, 21 if engine.model.device.type == "cuda" else 9, sync)


def decode_vs_floor(engine: Engine, batch: int, prompt: list[int]) -> dict:
    """A decode step at `batch` and the matmul passes at `batch`, timed in turn 15 times."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    reqs = [Request(f"d{batch}-{i}", prompt_token_ids=tuple(prompt), params=params)
            for i in range(batch)]  # fmt: skip
    return decode_step_vs_floor(engine, reqs, 15, matmul_floors(engine.model, batch))


def bench_dtype(
    name: str, model_dir: Path, prompts: list[list[int]], lengths: list[int], rounds: int
) -> dict:
    dtype = DTYPES[name]
    engine = Engine.from_config(EngineConfig(model="default", dtype=name, max_num_seqs=64))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = engine.tokenizer
    tokens = sum(lengths)
    run_engine(engine, prompts[:4], [8] * 4)  # warm-up
    ours, hf32, hf8 = [], [], []
    for _ in range(rounds):  # interleaved: a slow spell of a shared machine hits all three
        ours.append(timed(lambda: run_engine(engine, prompts, lengths)))
        hf32.append(timed(lambda: run_hf(hf, tok, prompts, lengths, 32)))
        hf8.append(timed(lambda: run_hf(hf, tok, prompts, lengths, 8)))
    t_ours, t_hf32, t_hf8 = map(statistics.median, (ours, hf32, hf8))
    floor = {}
    for b in (1, 8, 32):
        r = decode_vs_floor(engine, b, prompts[0])
        floor[str(b)] = {
            "decode_step_ms": r["step"] * 1e3,
            "matmul_pass_ms": r["floor"]["plain"] * 1e3,
            "step_over_floor": r["ratio"]["plain"],  # median of the 15 paired ratios
        }
        if "packed" in r["floor"]:  # the same pass on the packed weights the engine runs
            floor[str(b)]["packed_matmul_pass_ms"] = r["floor"]["packed"] * 1e3
            floor[str(b)]["step_over_packed_floor"] = r["ratio"]["packed"]
        if "gemv" in r["floor"]:  # the same pass through the matrix-vector kernel (CPU bf16)
            floor[str(b)]["gemv_matmul_pass_ms"] = r["floor"]["gemv"] * 1e3
            floor[str(b)]["step_over_gemv_floor"] = r["ratio"]["gemv"]
    return {
        "dtype": name,
        "useful_tokens": tokens,
        "engine_s": t_ours,
        "engine_tok_s": tokens / t_ours,
        "hf_generate_batch32_s": t_hf32,
        "hf_generate_batch32_tok_s": tokens / t_hf32,
        "hf_generate_batch8_s": t_hf8,
        "hf_generate_batch8_tok_s": tokens / t_hf8,
        # medians of the per-round ratios
        "speedup_vs_hf_batch32": statistics.median(map(operator.truediv, hf32, ours)),
        "speedup_vs_hf_batch8": statistics.median(map(operator.truediv, hf8, ours)),
        "rounds_s": {"engine": ours, "hf_generate_batch32": hf32, "hf_generate_batch8": hf8},
        "decode_floor": floor,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--out", default="bench/results/engine_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir("default")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    work = workload()
    prompts = [chat_ids(tok, m) for m, _ in work]
    lengths = [n for _, n in work]
    results = {
        "environment": environment(),
        "requests": len(work),
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": sum(lengths),
        "runs": [],
    }
    for name in args.dtypes.split(","):
        r = bench_dtype(name, model_dir, prompts, lengths, args.rounds)
        results["runs"].append(r)
        print(json.dumps(r, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
