"""The bf16 matrix-vector kernel (kernels/gemv.py) against oneDNN's packed matmul
(kernels/packed_linear.py; torch's dense bf16 linear, "torch_dense", where this CPU's oneDNN
has no bf16: AVX2 without AVX-512) over a whole SmolLM2-135M pass: 30 layers' q/k/v, o,
gate/up and down and the LM head, at M = 1..32 rows (and a few prefill sizes), 2 threads; with
the read floor (torch.sum over a bf16 tensor of the same 270 MB) in the same rounds. "gemv"
holds the weights as the CPU backend does, in one buffer of huge pages (kernels/huge_pages.py);
"gemv_4k_pages" the same packed weights each in its own allocation.

    .venv/bin/python -m bench.cpu_gemv                       # -> bench/results/cpu_gemv.json
    .venv/bin/python -m bench.cpu_gemv --rows 1 8 32 --rounds 5

Random weights of SmolLM2's shapes, each layer its own tensors (so no pass finds them in a
cache). The kinds run interleaved, one pass each in turn, `--rounds` times per row count:
drift of a shared machine hits them alike. Reported: median ms per pass, GB/s of weights read,
and the medians of the per-round gemv / oneDNN (or torch_dense) and gemv / read floor ratios.
`environment.vector_isa` names the kernel's code path (avx512_bf16, or avx2). "int8" and "int4":
the weight-only kernels (kernels/quant.py, serve --weights) over the same weights quantized,
held in huge pages too (int8 reads half the bytes, int4 3/8), with their time over gemv's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import environment
from peftserve.kernels import cpu_ext, gemv, huge_pages, packed_linear, quant

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 30, 49152, 9, 3, 64
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64, 128, 256)
# the engine's other bf16 kernel on this CPU: oneDNN's packed matmul, or torch's dense one where
# this CPU's oneDNN has no bf16 (AVX2 only)
BASELINE = "onednn" if packed_linear.supported(torch.bfloat16) else "torch_dense"


def shapes() -> list[tuple[int, int]]:
    """(N, K) of every base matmul of one forward pass, in order."""
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    layer = [(qkv, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    return layer * LAYERS + [(VOCAB, HIDDEN)]


def passes(rows: int, g: torch.Generator) -> dict[str, Callable[[], None]]:
    dense = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for n, k in shapes()]
    xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in (HIDDEN, INTER)}
    onednn = BASELINE == "onednn"
    other = [(packed_linear.pack(w) if onednn else w, xs[w.shape[1]]) for w in dense]
    other_linear = packed_linear.linear if onednn else torch.nn.functional.linear
    mine = [(gemv.pack(w), xs[w.shape[1]]) for w in dense]
    # the same packed weights in one buffer of huge pages, as the CPU backend holds them
    held = list(zip(huge_pages.gather([w for w, _ in mine]), [x for _, x in mine], strict=True))
    total = sum(w.numel() for w in dense)
    flat = huge_pages.gather([torch.randn(total, generator=g).bfloat16()])[0]
    # the weight-only int8 / int4 kernels (serve --weights) over the same weights, held so too
    xq = [x for _, x in mine]
    quantized = {k: list(zip(huge_pages.gather([quant.pack(w, k) for w in dense]), xq, strict=True))
                 for k in ("int8", "int4")}  # fmt: skip

    def run_other() -> None:
        for w, x in other:
            other_linear(x, w, None)

    def run_gemv(weights: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            for w, x in weights:
                quant.linear(x, w, None)

        return run

    return {"gemv": run_gemv(held), "gemv_4k_pages": run_gemv(mine),
            BASELINE: run_other, "read_floor": lambda: flat.sum(),
            "int8": run_gemv(quantized["int8"]), "int4": run_gemv(quantized["int4"])}


def measure(rows: int, rounds: int, g: torch.Generator) -> dict[str, object]:
    fns = passes(rows, g)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    weight_bytes = 2 * sum(n * k for n, k in shapes())
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    return {
        "rows": rows,
        "ms": ms,
        "GB_per_s": {name: weight_bytes / (t * 1e6) for name, t in ms.items()},
        f"gemv_over_{BASELINE}": ratio("gemv", BASELINE),
        "gemv_over_read_floor": ratio("gemv", "read_floor"),
        "int8_over_gemv": ratio("int8", "gemv"),
        "int4_over_gemv": ratio("int4", "gemv"),
        "gemv_over_gemv_4k_pages": ratio("gemv", "gemv_4k_pages"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cpu_gemv.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_ext.load():
        raise SystemExit(f"needs the C++ CPU kernels: {cpu_ext.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    results = []
    for rows in args.rows:
        r = measure(rows, args.rounds, g)
        ms = r["ms"]
        print(f"M={rows:4d}  gemv {ms['gemv']:7.2f} ms  {BASELINE} {ms[BASELINE]:7.2f} ms  "
              f"4 KB pages {ms['gemv_4k_pages']:7.2f} ms  read floor {ms['read_floor']:6.2f} ms  "
              f"gemv/{BASELINE} {r[f'gemv_over_{BASELINE}']:.3f}  "
              f"gemv/4 KB pages {r['gemv_over_gemv_4k_pages']:.3f}  "
              f"gemv/floor {r['gemv_over_read_floor']:.3f}  "
              f"int8 {ms['int8']:7.2f} ms  int4 {ms['int4']:7.2f} ms",
              flush=True)  # fmt: skip
        results.append(r)
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    out = {
        "environment": environment(),
        "threads": args.threads,
        "rounds": args.rounds,
        "weight_MB": 2 * sum(n * k for n, k in shapes()) / 1e6,
        "uptime_before_after": uptime,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
