"""Shared pieces of the benchmarks: the workload, timing, environment record."""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

TOPICS = [
    "the ocean",
    "a dragon",
    "black holes",
    "bread baking",
    "the roman empire",
    "chess",
    "volcanoes",
    "honey bees",
    "the moon landing",
    "jazz",
    "rainforests",
    "glaciers",
    "the printing press",
    "octopuses",
    "electric cars",
    "the olympics",
]
TASKS = [
    "Write a short story about {}.",
    "Explain {} to a child.",
    "List facts about {}.",
    "Write a poem about {}.",
]


def workload(n: int = 32, lo: int = 16, hi: int = 128, seed: int = 0) -> list[tuple[str, int]]:
    """n (user message, output length) pairs; lengths uniform in [lo, hi], fixed by the seed."""
    rng = random.Random(seed)
    return [(rng.choice(TASKS).format(rng.choice(TOPICS)), rng.randint(lo, hi)) for _ in range(n)]


def timed(
    fn: Callable[[], object], repeat: int = 1, sync: Callable[[], None] | None = None
) -> float:
    """Best wall time of `repeat` runs, in seconds; `sync` (e.g. torch.cuda.synchronize) runs
    before and after each, inside nothing timed but the run."""
    best = float("inf")
    sync = sync or _no_sync
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def median_time(
    fn: Callable[[], object], repeat: int, sync: Callable[[], None] | None = None
) -> float:
    times = []
    sync = sync or _no_sync
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _no_sync() -> None:
    return None


def start_decoding(engine, requests: list) -> None:
    """Adds `requests` and steps until every one has finished its prefill and decodes one
    token per step."""
    for r in requests:
        engine.add_request(r)
    while any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()


def step_phases(engine, run: Callable[[], object]) -> dict:
    """`run()` (requests through `engine`) with each engine step timed by what it held: the
    steps with prompt tokens (prefill chunks, maybe beside decodes) and the decode-only steps
    by batch size, each as [steps, ms]. A step's time runs from its call to its tokens back
    (a step queued ahead overlaps the host's part). Which phase a workload's time goes to,
    at a cost per step of two clock reads."""
    phases: dict[str, list] = {}
    step = engine.step

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        ms = (time.perf_counter() - t0) * 1e3
        seqs, tokens = engine.last_batch_size, engine.last_batch_tokens
        if seqs:
            at = phases.setdefault("prefill" if tokens > seqs else f"decode_{seqs}", [0, 0.0])
            at[0] += 1
            at[1] += ms
        return out

    engine.step = timed
    try:
        run()
    finally:
        del engine.step
    decodes = [v for k, v in phases.items() if k.startswith("decode_")]
    return {
        "prefill": phases.get("prefill", [0, 0.0]),
        "decode": [sum(n for n, _ in decodes), sum(ms for _, ms in decodes)],
        "decode_by_batch": dict(sorted((int(k[7:]), v) for k, v in phases.items()
                                       if k != "prefill")),
    }  # fmt: skip


def steady_step_time(engine, requests: list, steps: int) -> float:
    """Mean time of a decode step over `steps` consecutive ones, once every request in
    `requests` (added here) decodes: from one step's return (its tokens are back) to the
    return `steps` steps later, with no synchronization in between, so that a step queued
    ahead runs on while the host goes on (Engine.step). The requests are drained afterwards;
    their max_new_tokens must leave room for the steps."""
    start_decoding(engine, requests)
    engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    t = (time.perf_counter() - t0) / steps
    while engine.has_unfinished():
        engine.step()
    return t


def decode_step_vs_floor(
    engine,
    requests: list,
    repeat: int,
    floors: dict[str, Callable[[], object]],
    sync: Callable[[], None] | None = None,
) -> dict[str, object]:
    """A decode step (once every request decodes) and one pass of each floor, timed in turn `repeat`
    times, so that drift of a shared machine hits them alike. Returns the median step time
    (s) and, per floor name, its median time and the median of the paired step / floor
    ratios."""
    sync = sync or _no_sync
    start_decoding(engine, requests)
    for once in floors.values():
        once()
    steps: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in floors}
    for _ in range(repeat):
        for fn, out in ((engine.step, steps), *((f, times[n]) for n, f in floors.items())):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    while engine.has_unfinished():
        engine.step()
    return {
        "step": statistics.median(steps),
        "floor": {n: statistics.median(t) for n, t in times.items()},
        "ratio": {
            n: statistics.median(s / f for s, f in zip(steps, t, strict=True))
            for n, t in times.items()
        },
    }


def matmul_floors(
    model, batch: int, extra: Callable[[], None] | None = None
) -> dict[str, Callable[[], None]]:
    """One matmul pass over the base weights (every layer's projections and the LM head) at
    `batch` rows, then `extra` (e.g. the active adapters' matmuls), as floors for
    decode_step_vs_floor. "plain": F.linear on dense weights. "packed", where the model holds
    its weights packed for oneDNN (CPU half precision, kernels/packed_linear.py): the same pass
    on those, the faster kernel the engine itself runs, so the stricter floor; "gemv" likewise
    where it holds them for the matrix-vector kernel (CPU bf16, kernels/gemv.py)."""
    from torch.nn import functional as F

    from peftserve.kernels import packed_linear

    x = torch.randn(batch, model.shape.hidden, dtype=model.dtype, device=model.device)
    xi = torch.randn(batch, model.shape.intermediate, dtype=model.dtype, device=model.device)
    lins = [
        (lin, xi if lin.name == "down" else x)
        for layer in model.layers
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
    ]
    dense = [(lin.dense_weight(), xin) for lin, xin in lins]
    dense.append((model.lm_head_dense(), x))

    def plain() -> None:
        for w, xin in dense:
            F.linear(xin, w)
        if extra is not None:
            extra()

    floors = {"plain": plain}
    if model.lm_head_gemv is not None:  # CPU bf16: the matrix-vector kernel's layout
        from peftserve.kernels import gemv

        streamed = [(lin.gemv, xin) for lin, xin in lins]
        streamed.append((model.lm_head_gemv, x))

        def gemv_pass() -> None:
            for w, xin in streamed:
                gemv.linear(xin, w, None)
            if extra is not None:
                extra()

        floors["gemv"] = gemv_pass
    if model.lm_head_packed is not None:
        packed = [(lin.packed, xin) for lin, xin in lins]
        packed.append((model.lm_head_packed, x))

        def packed_pass() -> None:
            for w, xin in packed:
                packed_linear.linear(xin, w, None)
            if extra is not None:
                extra()

        floors["packed"] = packed_pass
    return floors


def alternate(forms: dict, rounds: int, run, after=lambda r: None) -> dict[str, list[float]]:
    """ms of run(form, round) per form, the forms alternating, each first every other round;
    after(round) runs untimed after each."""
    ms: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(rounds):
        for name in list(forms) if r % 2 == 0 else list(reversed(forms)):
            t0 = time.perf_counter()
            run(forms[name], r)
            ms[name].append((time.perf_counter() - t0) * 1e3)
            after(r)
    return ms


def environment() -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    cpu, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # the widest code the C++ kernels take here (one "AMD EPYC" or "Intel Xeon" name covers
    # several)
    isa = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "")
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "commit": commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "vector_isa": isa,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
