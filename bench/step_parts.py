"""Where a single-stream CPU decode step's time goes: the step and its parts, timed in one run.

    .venv/bin/python -m bench.step_parts --weights bf16 int8 int4
        # -> bench/results/step_parts_cpu.json

SmolLM2-135M (the default model) on the C++ CPU kernels as served (bf16 activations, the
base weights in each --weights form), 2 threads, one chat request alone of --tokens new
tokens, greedy, EOS ignored, --rounds times per form. `Engine.step` and the parts it calls are
wrapped with timers: the scheduler's decision, the step's inputs, rotary cos/sin, the one-call
decode stack (kernels/csrc/decode_forward_cpu.cpp: every layer), the LM head (with bf16 the
screened head and its argmax, kernels/screened_head.py: no sampling then), sampling and the
outputs; "rest" is the step less those. Medians over the decode steps (the prefill step is
left out). The wrappers cost a few microseconds a call.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import environment
from bench.single_stream import chat_prompt, uptime
from peftserve.config import EngineConfig
from peftserve.engine import model_runner
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.kernels import cpu_ext
from peftserve.layers.backend import CpuBackend

PARTS = ("schedule", "prepare", "cos_sin", "decode_stack", "lm_head", "sample", "outputs")


def recording(times: dict[str, list[float]], name: str, fn: Callable) -> Callable:
    """fn, each call's wall time appended to times[name]."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name].append(time.perf_counter() - t0)
        return out

    return call


def measure(weights: str, tokens: int, rounds: int) -> dict[str, object]:
    config = EngineConfig(model="default", dtype="bfloat16", device="cpu", weights=weights)
    engine = Engine.from_config(config, CpuBackend(native=True))
    times: dict[str, list[float]] = {name: [] for name in ("step", *PARTS)}
    model, runner = engine.model, engine.runner
    engine.step = recording(times, "step", engine.step)
    engine._schedule = recording(times, "schedule", engine._schedule)
    engine._process_samples = recording(times, "outputs", engine._process_samples)
    runner.prepare = recording(times, "prepare", runner.prepare)
    model.rotary.cos_sin = recording(times, "cos_sin", model.rotary.cos_sin)
    model.backend.decode_forward = recording(times, "decode_stack", model.backend.decode_forward)
    model.logits = recording(times, "lm_head", model.logits)
    if model.screened_head is not None:  # bf16's greedy steps: the screened head and its argmax
        model.greedy_tokens = recording(times, "lm_head", model.greedy_tokens)
    sample = model_runner.sample
    model_runner.sample = recording(times, "sample", sample)
    try:
        prompt = chat_prompt(engine)
        runs = []
        for r in range(rounds + 1):  # the first warms up
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            engine.add_request(Request(f"{weights}-{r}", prompt_token_ids=prompt, params=params))
            engine.step()  # the prefill
            for v in times.values():
                v.clear()
            while engine.has_unfinished():
                engine.step()
            if r:
                runs.append({k: statistics.median(v) for k, v in times.items() if v})
    finally:
        model_runner.sample = sample
    assert "decode_stack" in runs[0], "the decode steps did not take the one-call stack"
    ms = {k: 1e3 * statistics.median(run[k] for run in runs) for k in runs[0]}
    ms["rest"] = ms["step"] - sum(ms[p] for p in PARTS if p in ms)
    return {"median_ms": ms, "share_of_step": {k: v / ms["step"] for k, v in ms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", default=["bf16", "int8", "int4"],
                    choices=("bf16", "int8", "int4"))  # fmt: skip
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/step_parts_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_ext.load():
        raise SystemExit(f"needs the C++ CPU kernels: {cpu_ext.unavailable_reason()}")
    before = uptime()
    result: dict[str, object] = {"environment": environment(), "threads": args.threads,
                                 "tokens": args.tokens, "rounds": args.rounds}  # fmt: skip
    for weights in args.weights:
        result[weights] = measure(weights, args.tokens, args.rounds)
        print(weights, {k: round(v, 3) for k, v in result[weights]["median_ms"].items()})
    result["uptime_before_after"] = [before, uptime()]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
