"""Single-stream bf16 decode on the CPU: the matrix-vector kernel (kernels/gemv.py) against
oneDNN's packed matmul at every batch size, and the decode step against the weight read floor.

    .venv/bin/python -m bench.single_stream      # -> bench/results/single_stream_cpu.json

SmolLM2-135M (the default model), bf16, 2 threads, one chat request alone, greedy, EOS ignored,
--tokens new tokens. Three engines in one process: "gemv" (the CPU backend as it serves),
"gemv_4k_pages" (the same, each weight in its own allocation: CpuBackend(huge_pages=False))
and "onednn" (the same backend with gemv_rows=0: oneDNN's packed bf16 matmul, or torch's dense
one, then named "torch_dense", where this CPU's oneDNN has no bf16); each round runs the
request on each and times the read floor (torch.sum over a bf16 tensor as large as all base
matmul weights, the LM head included, held in huge pages as the served weights are), in turn,
so drift of a shared machine hits them alike. The kernel's engines read an int8 screen of the
LM head on these greedy steps instead of the head (kernels/screened_head.py; `lm_head_MB` and
`screened_head_MB` in the JSON), the same tokens from fewer bytes. Decode tok/s counts the
tokens after the first over the time after the first step (the prefill). Then the decode step
alone, against the read floor, paired 25 times (bench.common.decode_step_vs_floor).
With --batch-rounds > 0 also the 32-request workload (bench.common.workload(), all at once)
on every engine, interleaved: the kernel at 32-row decode steps and in the prefill chunks.
`uptime` is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.common import decode_step_vs_floor, environment, workload
from bench.cpu_gemv import BASELINE
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.kernels import cpu_ext, huge_pages
from peftserve.layers.backend import CpuBackend


def chat_prompt(engine: Engine, message: str | None = None) -> tuple[int, ...]:
    message = message or workload()[0][0]
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"]  # fmt: skip
    return tuple(ids)


def one_request(engine: Engine, prompt: tuple[int, ...], tokens: int, rid: str) -> dict:
    """Runs one request alone; its prefill step's and decode steps' wall times."""
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    engine.add_request(Request(rid, prompt_token_ids=prompt, params=params))
    t0 = time.perf_counter()
    engine.step()
    t1 = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps}


def many_requests(engine: Engine, prompts: list[tuple[int, ...]], lengths: list[int]) -> float:
    """The workload's requests all at once; seconds until every one has finished."""
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        engine.add_request(Request(f"w{i}-{t0}", prompt_token_ids=p, params=params))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def weight_elements(engine: Engine) -> int:
    model = engine.model
    lins = [lin for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                      layer.down)]  # fmt: skip
    return sum(lin.in_features * lin.out_features for lin in lins) + model.shape.vocab * (
        model.shape.hidden
    )


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/single_stream_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = uptime()
    if not cpu_ext.load():
        raise SystemExit(f"needs the C++ CPU kernels: {cpu_ext.unavailable_reason()}")
    config = EngineConfig(model="default", dtype="bfloat16", device="cpu")
    engines = {
        "gemv": Engine.from_config(config, CpuBackend(native=True)),
        "gemv_4k_pages": Engine.from_config(config, CpuBackend(native=True, huge_pages=False)),
        BASELINE: Engine.from_config(config, CpuBackend(native=True, gemv_rows=0)),
    }
    assert engines["gemv"].model.lm_head_gemv is not None, "the C++ kernels are not in use"
    prompt = chat_prompt(engines["gemv"])
    # the floor reads the same bytes from huge pages, as the served weights are held
    flat = huge_pages.gather([torch.randn(weight_elements(engines["gemv"])).bfloat16()])[0]
    floor_s: list[float] = []
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for name, eng in engines.items():  # warm-up
        one_request(eng, prompt, 8, f"warm-{name}")
    for r in range(args.rounds):
        for name, eng in engines.items():
            runs[name].append(one_request(eng, prompt, args.tokens, f"{name}-{r}"))
        t0 = time.perf_counter()
        flat.sum()
        floor_s.append(time.perf_counter() - t0)
    result: dict[str, object] = {}
    for name, rs in runs.items():
        result[name] = {
            "decode_tok_s": statistics.median((x["decode_steps"]) / x["decode_s"] for x in rs),
            "end_to_end_tok_s": statistics.median(args.tokens / x["total_s"] for x in rs),
            "prefill_ms": 1e3 * statistics.median(x["prefill_s"] for x in rs),
        }
    def speedup(a: str, b: str) -> float:
        return statistics.median((x["decode_steps"] / x["decode_s"]) /
                                 (y["decode_steps"] / y["decode_s"])
                                 for x, y in zip(runs[a], runs[b], strict=True))  # fmt: skip

    result[f"decode_speedup_gemv_over_{BASELINE}"] = speedup("gemv", BASELINE)
    result["decode_speedup_huge_over_4k_pages"] = speedup("gemv", "gemv_4k_pages")
    steps = {}
    for name, eng in engines.items():
        params = SamplingParams(max_new_tokens=60, ignore_eos=True)
        req = [Request(f"step-{name}", prompt_token_ids=prompt, params=params)]
        r = decode_step_vs_floor(eng, req, 25, {"read": lambda: flat.sum()})
        steps[name] = {
            "decode_step_ms": 1e3 * r["step"],
            "read_floor_ms": 1e3 * r["floor"]["read"],
            "step_over_read_floor": r["ratio"]["read"],
        }
    result["decode_step_vs_read_floor"] = steps
    if args.batch_rounds:
        work = workload()
        prompts = [chat_prompt(engines["gemv"], m) for m, _ in work]
        lengths = [n for _, n in work]
        secs: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.batch_rounds):
            for name, eng in engines.items():
                secs[name].append(many_requests(eng, prompts, lengths))
        result["requests_32"] = {
            **{f"{n}_tok_s": sum(lengths) / statistics.median(t) for n, t in secs.items()},
            f"gemv_over_{BASELINE}": statistics.median(
                b / a for a, b in zip(secs["gemv"], secs[BASELINE], strict=True)
            ),
        }
    result["read_floor_ms_in_rounds"] = 1e3 * statistics.median(floor_s)
    shape = engines["gemv"].model.shape
    out = {
        "environment": environment(),
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "prompt_tokens": len(prompt),
        "weight_MB": 2 * flat.numel() / 1e6,
        # greedy steps of the engines that have it read this int8 screen instead of the LM head
        # (kernels/screened_head.py), plus a few of the head's tiles
        "lm_head_MB": 2 * shape.vocab * shape.hidden / 1e6,
        "screened_head_MB": {name: eng.model.screened_head.screen.numel() / 1e6
                             if eng.model.screened_head is not None else 0.0
                             for name, eng in engines.items()},  # fmt: skip
        "uptime_before_after": [load_before, uptime()],
        **result,
    }
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
