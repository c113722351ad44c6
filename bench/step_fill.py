"""Host time of the static decode step's block tables: what the thread that runs the steps
spends a step writing each row's KV block table into the pinned buffer, before the GPU can
start (the step's upload waits for it).

    .venv/bin/python -m bench.step_fill [--steps 200] [--out PATH]
        # -> bench/results/step_fill_cpu.json

Rows of one batch at one context length (blocks of 16), each sequence's table a Python list
as the block manager keeps it, one block appended to one row in 16 each step (decoding). Forms,
alternating by round, the median of the rounds in microseconds a step:
  list     each row's list converted into the buffer every step (before BlockTableRows)
  mirror   each row's table kept as an array that grows with its list (BlockTableRows), copied
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import environment
from peftserve.engine.step_buffers import BlockTableRows

BLOCK = 16


def run(rows: int, ctx: int, steps: int, form: str) -> float:
    """Microseconds a step, over `steps` steps."""
    width = -(-ctx // BLOCK)
    lists = [list(range(r * width, (r + 1) * width - 1)) for r in range(rows)]
    tables = np.zeros((rows, width), dtype=np.int64)
    mirror = BlockTableRows(rows)
    t0 = time.perf_counter()
    for step in range(steps):
        lists[step % rows].append(rows * width + step) if step % 16 == 0 else None
        tables[:] = 0
        for i, blocks in enumerate(lists):
            row = blocks[:width] if form == "list" else mirror.row(i, blocks)[:width]
            tables[i, : len(row)] = row
        mirror.keep(range(rows))
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows_out = []
    for rows in (8, 32, 64):
        for ctx in (256, 1024, 8192):
            samples: dict[str, list[float]] = {"list": [], "mirror": []}
            for _ in range(args.rounds):
                for form in samples:
                    samples[form].append(run(rows, ctx, args.steps, form))
            us = {form: statistics.median(v) for form, v in samples.items()}
            rows_out.append({"rows": rows, "context": ctx, "us_per_step": us,
                             "list_over_mirror": us["list"] / us["mirror"]})  # fmt: skip
            print(json.dumps(rows_out[-1]), flush=True)
    result = {
        "command": "python -m bench.step_fill " + " ".join(
            f"--{k} {v}" for k, v in (("steps", args.steps), ("rounds", args.rounds))),
        "environment": environment(),
        "block_size": BLOCK,
        "rows": rows_out,
    }  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / "step_fill_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
