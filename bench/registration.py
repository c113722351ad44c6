"""Registering an adapter from disk: its read and validation, against the same registration with
the finiteness checked tensor by tensor and the file's hash computed before parsing (how
server/adapters/files.py did both before), alternated in one process.

    .venv/bin/python -m bench.registration [--rounds 12] [--rank 16] [--out PATH]
        # -> bench/results/registration_cpu.json

SmolLM2-135M (the default model), bf16, 2 threads, a rank-16 LoRA on every linear module of
every layer (PEFT's format, fp32 tensors as PEFT saves them: 420 tensors, 17 MB), written to
disk once per round (four files, reused), registered with `engine.adapters.register` (what the
server's RegisterAdapter runs: read, hash, parse, validate, and keep) and unregistered. The two
forms alternate, each first in every other round; medians of the rounds. The adapter's first
request (slot write, prefill) is not part of it: bench/multi_adapter.py's cold start times that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from bench.common import environment
from bench.multi_adapter import ALL, write_lora
from peftserve.adapters import files
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine


class _Inline:
    """An executor that runs each task at once, on the caller's thread."""

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/registration_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_config(EngineConfig(model="default", dtype="bfloat16", max_loras=8,
                                             max_lora_rank=max(64, args.rank)))  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="peftserve-registration-"))
    paths = [write_lora(root / f"a{i}", engine.model.shape, args.rank, ALL, seed=i)
             for i in range(4)]  # fmt: skip
    mb = (paths[0] / "adapter_model.safetensors").stat().st_size / 1e6
    forms = {  # name: (the finiteness check, the hashes' executor)
        "now": (files._sums_finite, files._HASHERS),
        "tensor_by_tensor_inline_hash": (lambda tensors: False, _Inline()),
    }
    ms: dict[str, list[float]] = {name: [] for name in forms}
    try:
        for r in range(args.rounds):
            order = list(forms) if r % 2 == 0 else list(reversed(forms))
            for name in order:
                files._sums_finite, files._HASHERS = forms[name]
                t0 = time.perf_counter()
                engine.adapters.register(f"r{r}-{name}", paths[r % len(paths)])
                ms[name].append((time.perf_counter() - t0) * 1e3)
                engine.adapters.unregister(f"r{r}-{name}")
    finally:
        files._sums_finite, files._HASHERS = forms["now"]
    p50 = {name: statistics.median(v) for name, v in ms.items()}
    result = {
        "environment": environment(),
        "threads": args.threads,
        "adapter": {"kind": "lora", "rank": args.rank, "targets": ALL, "file_MB": mb},
        "register_ms_p50": p50,
        "now_over_before": p50["now"] / p50["tensor_by_tensor_inline_hash"],
        "rounds_ms": ms,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("register_ms_p50", "now_over_before")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
