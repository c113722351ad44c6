"""What serving through gRPC costs: the offline engine against a real `peftserve serve` process
with 32 streaming clients, on the same workload in the same run.

    .venv/bin/python -m bench.serving                  # SmolLM2 (--model default), 2 threads

Workload: bench.common.workload() — 32 chat requests given at once, output lengths 16..128
(seed 0), greedy, EOS ignored, so every path produces exactly the same tokens. Two paths:

- offline_engine: `Engine.step()` driven on this process's main thread (the issue's baseline);
- grpc_streaming: a `peftserve serve` process, the same messages (chat template applied
  server-side) from 32 concurrent streams over one channel.

The offline engine is the only engine in this process: a second one (an `AsyncEngine` built on
its own thread, to measure the server's threading without gRPC) slowed the offline steps by
15-20% in every round of a 7-round run, which would flatter the server's ratio.

TTFT is measured from submission to the first output carrying tokens, inter-token latency from
the gaps between such outputs (on the client for gRPC). The paths alternate `--repeat` times
(an idle path uses no CPU), so that other work on the machine hits them alike; the best wall
time of each is kept, and each round's gRPC run is also compared with the offline run just
before it (round ratios: slow drift of the machine cancels out of them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from bench.common import environment, workload
from peftserve.client import AsyncClient, Sampling
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams

READY = re.compile(r"peftserve listening on (\S+:\d+)")
NOTE = ("shared 2-core machine, other jobs running: numbers are noisy. offline_engine drives "
        "Engine.step() on the main thread (the only engine in the bench process); "
        "grpc_streaming is the server process with 32 streaming clients in this process. "
        "Best of `repeat` alternating runs each; "
        "round ratios pair each gRPC run with the offline run of the same round.")


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3}


def summary(wall: float, tokens: int, ttft: list[float], itl: list[float]) -> dict:
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft": percentiles(ttft), "inter_token": percentiles(itl)}


# --- offline ------------------------------------------------------------------------------

def run_offline(engine: Engine, work: list[tuple[str, int]]) -> dict:
    reqs = [Request(f"r{i}", messages=({"role": "user", "content": m},),
                    params=SamplingParams(max_new_tokens=n, ignore_eos=True))
            for i, (m, n) in enumerate(work)]
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    last: dict[str, float] = {}
    ttft, itl = [], []
    tokens = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            n = len(out.token_ids)
            if not n:
                continue
            tokens += n
            if out.request_id not in last:
                ttft.append(now - t0)
            else:
                itl += [(now - last[out.request_id]) / n] * n
            last[out.request_id] = now
    wall = time.perf_counter() - t0
    assert tokens == sum(n for _, n in work), tokens
    return summary(wall, tokens, ttft, itl)


# --- streamed: the engine on its own thread, in-process or behind gRPC ----------------------

async def _timed_stream(chunks: AsyncIterator[int]) -> tuple[int, float, list[float]]:
    """(tokens, TTFT, inter-token gaps) of one request; `chunks` yields token counts."""
    start = time.perf_counter()
    first, last, gaps, got = None, start, [], 0
    async for k in chunks:
        if not k:
            continue
        now = time.perf_counter()
        if first is None:
            first = now - start
        else:
            gaps += [(now - last) / k] * k
        last = now
        got += k
    assert first is not None
    return got, first, gaps


async def _run_streams(streams: list[AsyncIterator[int]], expected: int) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_timed_stream(s) for s in streams))
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    assert tokens == expected, (tokens, expected)
    return summary(wall, tokens, [r[1] for r in results], [g for r in results for g in r[2]])


async def run_clients(target: str, work: list[tuple[str, int]]) -> dict:
    async with AsyncClient(target, timeout=600) as client:
        async def one(message: str, n: int) -> AsyncIterator[int]:
            async for chunk in client.generate_stream(
                    messages=[{"role": "user", "content": message}],
                    sampling=Sampling(max_new_tokens=n, ignore_eos=True)):
                yield len(chunk.token_ids)

        return await _run_streams([one(m, n) for m, n in work], sum(n for _, n in work))


def start_server(args: argparse.Namespace,
                 extra: Sequence[str] = ()) -> tuple[subprocess.Popen[str], str]:
    """`peftserve serve` with args.model, args.dtype and args.threads, then `extra` flags."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftserve.cli", "serve", "--model", args.model, "--dtype",
         args.dtype, "--num-threads", str(args.threads), "--max-num-seqs", "64", "--port", "0",
         "--metrics-port", "-1", *extra], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = READY.search(line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("the server exited before it was ready")


# --- main ---------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/results/serving.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = workload()

    proc, target = start_server(args)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=64,
                          num_threads=args.threads)
    try:
        engine = Engine.from_config(config)
        dtype = str(engine.model.dtype).removeprefix("torch.")
        run_offline(engine, work[:4])  # warm-ups
        asyncio.run(run_clients(target, work[:4]))
        runs: dict[str, list[dict]] = {"offline_engine": [], "grpc_streaming": []}
        for i in range(args.repeat):
            runs["offline_engine"].append(run_offline(engine, work))
            runs["grpc_streaming"].append(asyncio.run(run_clients(target, work)))
            print(f"run {i}: " + ", ".join(f"{k} {v[-1]['tok_s']:.1f} tok/s"
                                           for k, v in runs.items()), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    server = best["grpc_streaming"]

    def added(base: dict, what: str) -> dict[str, float]:
        return {k: server[what][k] - base[what][k] for k in base[what]}

    result = {
        "environment": environment(),
        "model": args.model, "dtype": dtype, "requests": len(work),
        "output_tokens": sum(n for _, n in work), "repeat": args.repeat,
        "runs_tok_s": {k: [r["tok_s"] for r in v] for k, v in runs.items()},
        **best,
        "throughput_ratio_vs_offline_engine": server["tok_s"] / best["offline_engine"]["tok_s"],
        # each round's gRPC run against the offline run just before it: drift between rounds
        # cancels out of these
        "round_ratios_vs_offline_engine": [
            g["tok_s"] / o["tok_s"]
            for g, o in zip(runs["grpc_streaming"], runs["offline_engine"], strict=True)
        ],
        "median_round_ratio_vs_offline_engine": statistics.median(
            g["tok_s"] / o["tok_s"]
            for g, o in zip(runs["grpc_streaming"], runs["offline_engine"], strict=True)
        ),
        "added_ttft_ms_vs_offline_engine": added(best["offline_engine"], "ttft"),
        "added_inter_token_ms_vs_offline_engine": added(best["offline_engine"], "inter_token"),
        "note": NOTE,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("throughput", "added"))},
                     indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
