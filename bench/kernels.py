"""Benchmark of peftserve.kernels.add_lowrank_delta at SmolLM2-135M sizes.

    python bench/kernels.py [--out PATH] [--reps N] [--threads N]

32 slots with ranks 8/16/32/64 (R_max 64); decode: 32 tokens, one per slot, in shuffled order;
prefill: 512 tokens, 8 sequences of 64 with 8 different slots. Every adapted module of a layer:
q/k/v in one launch (576 -> 576+192+192), o (576 -> 576), gate/up (576 -> 1536+1536),
down (1536 -> 576). Methods are timed round-robin in the same run and reported as ratios.

CPU: ours (dispatcher, layout by shape), ours_packed (the dispatcher as the engine calls it,
with the packed slots: in half precision the by-segment packed form), each CPU layout
forced, per-adapter torch matmuls (PEFT's mixed-batch approach: one sub-batch per adapter), and
the naive reference loop.
CUDA: ours (Triton), a padded-to-max-rank bmm over slots, per-adapter torch matmuls; achieved
GB/s (exact-rank weights + activations moved) against the device's measured copy bandwidth.
Writes bench/results/kernels_cpu.json or kernels_cuda.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peftserve.kernels import SegmentMeta, add_lowrank_delta, build_segment_meta
from peftserve.kernels.cpu_lowrank import lowrank_delta_cpu
from peftserve.kernels.cpu_packed import pack_lora
from peftserve.kernels.reference import lowrank_delta_reference

N_SLOTS, R_MAX, RANKS = 32, 64, (8, 16, 32, 64)
MODULES = {  # name: (in, slice widths)
    "qkv": (576, (576, 192, 192)),
    "o": (576, (576,)),
    "gate_up": (576, (1536, 1536)),
    "down": (1536, (576,)),
}
PHASES = {"decode": 32, "prefill": 512, "decode_qv": 32}
# decode_qv (qkv only): 32 tokens in 32 slots of LoRAs on q and v (k rank 0), ranks 8/16,
# the seed's default adapter shape.


def make_problem(module: str, phase: str, dtype: torch.dtype, device: str) -> dict:
    d_in, slices = MODULES[module]
    g = torch.Generator().manual_seed(0)
    n_tokens = PHASES[phase]
    if phase in ("decode", "decode_qv"):
        token_slot = torch.randperm(N_SLOTS, generator=g)
    else:
        token_slot = torch.randperm(N_SLOTS, generator=g)[:8].repeat_interleave(64)
    ranks = (8, 16) if phase == "decode_qv" else RANKS
    rank = torch.tensor([ranks[s % len(ranks)] for s in range(N_SLOTS)], dtype=torch.int32)
    rank = rank.repeat(len(slices), 1).contiguous()
    A = torch.zeros(len(slices), N_SLOTS, R_MAX, d_in)
    B = torch.zeros(N_SLOTS, sum(slices), R_MAX)
    for s in range(N_SLOTS):  # storage past each rank stays zero, as the engine leaves it
        A[:, s, : rank[0, s]] = torch.randn(len(slices), int(rank[0, s]), d_in, generator=g) * 0.05
        B[s, :, : rank[0, s]] = torch.randn(sum(slices), int(rank[0, s]), generator=g) * 0.05
    if phase == "decode_qv":  # no update on k
        rank[1] = 0
        A[1] = 0
        B[:, slices[0] : slices[0] + slices[1]] = 0
    return {
        "x": torch.randn(n_tokens, d_in, generator=g).to(device, dtype),
        "y": torch.randn(n_tokens, sum(slices), generator=g).to(device, dtype),
        "A": A.to(device, dtype),
        "B": B.to(device, dtype),
        "rank": rank.to(device),
        "scale": (24.0 / rank).to(device),  # lora_alpha / r with alpha 24: not a power of two
        "token_slot": token_slot,
        "meta": build_segment_meta(token_slot.to(device)),
        "slice_sizes": slices,
    }


def moved_bytes(p: dict) -> int:
    """Exact-rank weights of the active slots, x rows read, y rows read and written."""
    elem = p["x"].element_size()
    meta: SegmentMeta = p["meta"]
    ranks = p["rank"].tolist()
    weights = sum(
        ranks[i][s] * (p["x"].shape[1] + width)
        for s in meta.seg_slots_list
        for i, width in enumerate(p["slice_sizes"])
    )
    rows = meta.num_active_tokens * (p["x"].shape[1] + 2 * p["y"].shape[1])
    return (weights + rows) * elem


def ours(p: dict) -> Callable[[], object]:
    args = (p["x"], p["A"], p["B"], p["rank"], p["scale"], p["meta"], p["slice_sizes"])
    return lambda: add_lowrank_delta(p["y"], *args)


def ours_packed(p: dict) -> Callable[[], object]:
    """The dispatcher as the engine calls it on the CPU: with every slot's packed LoRA
    (cpu_packed.pack_lora), which half precision reads segment by segment without the C++
    kernels; fp32 ignores them."""
    packed = [pack_lora(p["A"], p["B"], p["rank"], p["scale"], s, p["slice_sizes"])
              for s in range(p["A"].shape[1])]  # fmt: skip
    args = (p["x"], p["A"], p["B"], p["rank"], p["scale"], p["meta"], p["slice_sizes"])
    return lambda: add_lowrank_delta(p["y"], *args, packed=packed)


def cpu_layout(padded: bool) -> Callable[[dict], Callable[[], object]]:
    def make(p: dict) -> Callable[[], object]:
        args = (p["x"], p["A"], p["B"], p["rank"], p["scale"], p["meta"], p["slice_sizes"])
        return lambda: lowrank_delta_cpu(p["y"], *args, None, None, None, padded=padded)

    return make


def per_adapter(p: dict) -> Callable[[], object]:
    """One sub-batch per adapter, as PEFT's mixed batches do; index lists built once per step."""
    slots = p["token_slot"].unique().tolist()
    rows = {s: torch.nonzero(p["token_slot"] == s).flatten().to(p["x"].device) for s in slots}
    ranks, scales = p["rank"].tolist(), p["scale"].tolist()
    x, y, A, B = p["x"], p["y"], p["A"], p["B"]

    def run() -> None:
        for s in slots:
            xs, off = x[rows[s]], 0
            for i, width in enumerate(p["slice_sizes"]):
                r = ranks[i][s]
                d = (xs @ A[i, s, :r].T) @ B[s, off : off + width, :r].T
                y[rows[s], off : off + width] += scales[i][s] * d
                off += width

    return run


def padded_bmm(p: dict) -> Callable[[], object]:
    """Every slot of the span padded to R_max: one batched matmul per stage, no rank masking
    in the kernel (masked after), the usual max-rank baseline."""
    meta: SegmentMeta = p["meta"]
    lo, hi = meta.slot_span
    m, x, y, A, B = meta.max_seg_len, p["x"], p["y"], p["A"], p["B"]
    mask = (torch.arange(R_MAX, device=x.device) < p["rank"][:, lo:hi, None]) * p["scale"][
        :, lo:hi, None
    ]
    mask = mask.unsqueeze(2).to(x.dtype)  # [n, span, 1, R_max]

    def run() -> None:
        x_pad = x.new_zeros((hi - lo) * m, x.shape[1])
        x_pad[meta.pad_index] = x[meta.sorted_tokens]
        h = torch.matmul(x_pad.view(hi - lo, m, -1), A[:, lo:hi].transpose(2, 3)) * mask
        off = 0
        for i, width in enumerate(p["slice_sizes"]):
            out = torch.matmul(h[i], B[lo:hi, off : off + width].transpose(1, 2))
            y[:, off : off + width].index_add_(
                0, meta.sorted_tokens, out.flatten(0, 1)[meta.pad_index]
            )
            off += width

    return run


def reference(p: dict) -> Callable[[], object]:
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    args = ("y", "x", "A", "B", "rank", "scale", "token_slot")
    return lambda: lowrank_delta_reference(*(cpu[a] for a in args), cpu["slice_sizes"])


def time_round_robin(
    fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """ms per call, one sample per rep; methods interleaved in a shuffled order each rep, so
    that machine noise and cache state hit them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    names, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(names)  # so that no method always runs on the caches another one left
        for name in names:
            if name == "reference" and len(samples[name]) == 3:  # seconds per call at prefill
                continue
            iters = 1 if name == "reference" else 5
            start = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) / iters * 1e3)
    return samples


def max_error(p: dict, make: Callable[[dict], Callable[[], object]]) -> float:
    """Max |ours - method| on a fresh y, both starting from the same values."""
    y0 = p["y"].clone()
    ours(p)()
    got, p["y"] = p["y"], y0.clone()
    make(p)()
    err = float((got.float() - p["y"].float()).abs().max())
    p["y"] = y0
    return err


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: read + write bytes per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start) / 1e9


def measure(
    module: str,
    phase: str,
    dtype: torch.dtype,
    device: str,
    methods: dict[str, Callable[[dict], Callable[[], object]]],
    reps: int,
    sync: Callable[[], None],
    peak_gbs: float | None,
) -> dict:
    """One row of the results: every method on one problem, timed in the same loop."""
    p = make_problem(module, phase, dtype, device)
    errors = {n: max_error(p, methods[n]) for n in methods if n not in ("ours", "reference")}
    samples = time_round_robin({name: make(p) for name, make in methods.items()}, reps, sync)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    moved = moved_bytes(p)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "phase": phase,
        "module": module,
        "tokens": PHASES[phase],
        "ms": ms,
        "min_ms": {name: min(values) for name, values in samples.items()},
        "speedup_of_ours": {name: t / ms["ours"] for name, t in ms.items() if name != "ours"},
        # exact-rank weights + activations moved, per second, for each method
        "gbs": {name: moved / t / 1e6 for name, t in ms.items()},
        "ours_fraction_of_device_copy_bw": moved / ms["ours"] / 1e6 / peak_gbs
        if peak_gbs
        else None,
        "max_abs_diff_vs_ours": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        methods = {"ours": ours, "padded_bmm": padded_bmm, "per_adapter": per_adapter}
        dtypes = (torch.float16, torch.bfloat16, torch.float32)
    else:
        methods = {"ours": ours, "ours_packed": ours_packed, "cpu_by_segment": cpu_layout(False),
                   "cpu_padded": cpu_layout(True), "per_adapter": per_adapter,
                   "reference": reference}  # fmt: skip
        dtypes = (torch.float32, torch.bfloat16)
    reps = 50 if cuda else args.reps
    load_before = os.getloadavg()
    peak_gbs = copy_bandwidth_gbs() if cuda else None
    rows = []
    for dtype in dtypes:
        for phase in PHASES:
            for module in MODULES:
                if phase == "decode_qv" and module != "qkv":
                    continue
                rows.append(measure(module, phase, dtype, device, methods, reps, sync, peak_gbs))
                print(json.dumps(rows[-1]), flush=True)
    empty = make_problem("qkv", "decode", torch.float32, device)
    empty["meta"] = build_segment_meta(torch.full((32,), -1, device=device))
    base_only_ms = statistics.median(time_round_robin({"ours": ours(empty)}, 5, sync)["ours"])
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "setup": {
            "slots": N_SLOTS,
            "r_max": R_MAX,
            "ranks": RANKS,
            "modules": MODULES,
            "tokens": PHASES,
            "timing": "ms per call: median (ms) and min (min_ms) over reps, methods interleaved",
        },  # fmt: skip
        "device_copy_gbs": peak_gbs,
        "base_only_ms": base_only_ms,
        # Other processes on the machine skew CPU timings (2 OpenMP threads stall when a core is
        # taken): 1-minute load averages when the run started and ended.
        "load_average": [load_before[0], os.getloadavg()[0]],
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"kernels_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
