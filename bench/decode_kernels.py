"""Decode-step kernels on the GPU: the Triton paged attention against gather + SDPA, the
token-by-token LoRA kernels (one launch per stage for every slice and adapter) against the
segment kernels the engine ran before, and the hand-written fused small ops against
torch.compile's (Inductor's) fusion of the same torch code, at SmolLM2-135M's and
Llama-3.1-8B's shapes.

    python bench/decode_kernels.py [--out PATH] [--reps N] [--batches 1 8 32 64]
                                   [--ops attention,lora,fused] [--shapes NAME ...]

bf16 (`--dtype`). Attention: each sequence's context drawn from [max_ctx / 2, max_ctx] (ragged),
blocks of 16 scattered over the cache; also with the block tables as wide as a CUDA graph's
(the longest context it serves, 8192 by default: the splits past each context are empty).
LoRA: 32 slots of ranks 8/16/32/64 (R_max 64), each token in a random slot, every adapted
projection of a layer (qkv and gate_up with their slices in one call). Each method is timed
eagerly (launches included, ms per call) and replayed from a CUDA graph of 20 calls (the kernels
alone); GB/s counts the bytes a call must read (KV of the contexts; exact-rank weights of the
slots in use plus activations). Fused ops
(kernels/triton_fused.py, what TritonBackend runs): residual add + RMSNorm, rotary + the K/V
cache write, SiLU-and-multiply, each against the reference backend's torch code eager and
compiled by `torch.compile(dynamic=True)` (the first call at each row's sizes timed: it holds
the compile where one happens; bytes: the activations read and written). Writes
bench/results/decode_kernels_cuda.json (`--ops fused` alone: decode_fused_ops_cuda.json). Needs
a CUDA device; `--device cpu` runs the same code on the CPU, the Triton kernels in the
interpreter and no graphs (a dry run: tests/unit/test_decode_kernels_bench.py, at the "tiny"
shape; in fp16 or fp32, as the interpreter's `tl.dot` does not take bf16: triton-lang/triton
#11584).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peftserve.config import EngineConfig
from peftserve.kernels import build_segment_meta
from peftserve.layers.attention import AttentionMetadata
from peftserve.layers.backend import Backend
from peftserve.layers.triton_backend import TritonBackend

SHAPES = {  # heads, kv_heads, head_dim, hidden, intermediate
    "smollm2-135m": (9, 3, 64, 576, 1536),
    "llama-3.1-8b": (32, 8, 128, 4096, 14336),
    "tiny": (4, 2, 16, 64, 96),  # the CPU dry run's (not run by default)
}
BLOCK_SIZE, MAX_CTX = 16, 1024
GRAPH_LEN = EngineConfig.max_cuda_graph_len  # the block-table width of a captured step
N_SLOTS, R_MAX, RANKS = 32, 64, (8, 16, 32, 64)
SLOT_RANKS = [RANKS[s % len(RANKS)] for s in range(N_SLOTS)]  # slot s's rank, every slice
GRAPH_CALLS = 20
DEV = "cuda"  # --device
DTYPE = torch.bfloat16  # --dtype


def sync() -> None:
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], reps: int) -> tuple[float, float | None]:
    """(eager ms per call, median of reps; ms per call replayed from a CUDA graph, or None
    where the method cannot be captured)."""
    for _ in range(3):
        fn()
    sync()
    eager = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(5):
            fn()
        sync()
        eager.append((time.perf_counter() - start) / 5 * 1e3)
    if not DEV.startswith("cuda"):
        return statistics.median(eager), None
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(GRAPH_CALLS):
                    fn()
        torch.cuda.synchronize()
        replays = []
        for _ in range(max(3, reps // 4)):
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            replays.append((time.perf_counter() - start) / GRAPH_CALLS * 1e3)
        graphed: float | None = statistics.median(replays)
    except RuntimeError as err:  # a method that syncs or allocates on the host
        print(f"  not capturable: {err}", file=sys.stderr)
        graphed = None
    return statistics.median(eager), graphed


def attention_row(shape: str, batch: int, reps: int) -> dict:
    from peftserve.kernels.triton_paged_attention import paged_decode_attention

    heads, kv_heads, D, _, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(MAX_CTX // 2, MAX_CTX + 1, (batch,), generator=g)
    max_blocks = MAX_CTX // BLOCK_SIZE
    num_blocks = batch * max_blocks + 8
    tables = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    dev, dt = DEV, DTYPE
    cache = torch.randn(2, kv_heads, num_blocks * BLOCK_SIZE, D, device=dev, dtype=dt)
    q = torch.randn(batch, heads, D, device=dev, dtype=dt)
    tables, lens = tables.to(dev), lens.to(dev)
    mask = torch.arange(max_blocks * BLOCK_SIZE, device=dev)[None, :] < lens[:, None]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.long, device=dev), num_decodes=batch,
        block_size=BLOCK_SIZE, decode_blocks=tables, decode_mask=mask[:, None, None, None, :],
        decode_lens=lens, prefills=(),
    )  # fmt: skip
    scale = D**-0.5
    # The block tables a captured step passes: as wide as the longest context a graph serves
    # (EngineConfig.max_cuda_graph_len), the splits past each context empty.
    wide = torch.zeros(batch, GRAPH_LEN // BLOCK_SIZE, dtype=tables.dtype, device=dev)
    wide[:, :max_blocks] = tables
    methods = {
        "triton_paged": lambda: paged_decode_attention(q, cache, tables, lens, BLOCK_SIZE, scale),
        "triton_paged_graph_width": lambda: paged_decode_attention(q, cache, wide, lens,
                                                                   BLOCK_SIZE, scale),
        "gather_sdpa": lambda: Backend().decode_attention(q, cache, meta, scale),
    }
    out = methods["triton_paged"]().float()
    diff = (out - methods["gather_sdpa"]().float()).abs().max()
    assert torch.equal(methods["triton_paged_graph_width"]().float(), out)  # the same bits
    kv_bytes = int(lens.sum()) * kv_heads * D * 2 * cache.element_size()
    return _row("attention", shape, batch, methods, reps, kv_bytes, float(diff),
                {"ctx": [int(lens.min()), int(lens.max())]})  # fmt: skip


TILE_NAMES = ("EXPAND_BLOCK_N", "EXPAND_WARPS", "SHRINK_BLOCK_K", "SHRINK_WARPS", "RANK_CHUNK",
              "SHRINK_PROGRAMS", "SHRINK_RANK_GRID")
# What `--lora-tiles` sweeps given none (gpu.sh's lora_tiles step): the default; more shrink
# programs; shrink programs of 16 or 32 ranks each; wider expand tiles, and loops over each
# slot's rank in chunks, each with more shrink programs too. The tile table takes both kernels
# from the tile whose pair is fastest (the expand adds up the shrink's splits), so the list
# pairs each expand form with shrink forms. Every one compiles for sm_90 without spills
# (tests/kernels/gpu_compile.py --lora-tiles, in CI).
SWEEP_TILES = (
    "64:4:128:4", "64:4:128:4:0:512", "64:4:128:4:0:1024", "64:4:128:4:0:2048",
    "64:4:64:4:0:2048", "64:4:128:4:0:1024:16", "64:4:256:4:0:2048:16", "64:4:128:4:0:2048:32",
    "128:8:128:4", "128:8:128:4:0:1024", "128:8:128:4:0:1024:16", "256:8:128:4:32",
    "256:8:128:4:32:1024", "256:8:128:4:32:1024:16", "256:4:256:4:16", "256:8:128:4",
    "128:4:128:8:0:1024",
)
# The last three fields where a tile leaves them out: the kernels' defaults (one tile of every
# rank; 256 shrink programs, each over all of its slot's ranks)
LEFT_OUT = (0, 256, 0)


def tile_values(tile: str) -> list[int]:
    """"BLOCK_N:warps:BLOCK_K:warps[:RANK_CHUNK[:PROGRAMS[:RANK_GRID]]]" (expand's columns a
    program and warps, shrink's input columns a loop step and warps, ranks a step of a loop over
    each slot's own rank, 0: one tile of every rank; the shrink's programs a launch aims at; the
    ranks a shrink program takes, 0: all of its slot's; left out: LEFT_OUT) -> the values of
    TILE_NAMES."""
    values = [int(v) for v in tile.split(":")]
    if not 4 <= len(values) <= len(TILE_NAMES) or min(values) < 0:
        raise ValueError(f"tiles N:W:K:W[:RC[:P[:RG]]] of non-negative integers, got {tile!r}")
    return values + list(LEFT_OUT[len(values) - 4 :])


def kernel_tiles(tile: str) -> dict[str, dict[str, int]]:
    """A tile string's fields for each kernel, as a lora_tiles.TileTable entry holds them."""
    n, n_warps, k, k_warps, chunk, programs, grid = tile_values(tile)
    return {"shrink": {"block": k, "warps": k_warps, "rank_chunk": chunk, "programs": programs,
                       "rank_grid": grid},
            "expand": {"block": n, "warps": n_warps, "rank_chunk": chunk}}  # fmt: skip


def set_tiles(tile: str) -> str:
    """Sets the one-launch LoRA kernels' default tiles from a tile string (tile_values);
    returns the tiles it replaced, in the same form."""
    from peftserve.kernels import triton_lowrank_rows as rows_module

    values = tile_values(tile)
    before = ":".join(str(getattr(rows_module, n)) for n in TILE_NAMES)
    for n, v in zip(TILE_NAMES, values, strict=True):
        setattr(rows_module, n, v)
    return before


def lora_tiles(shape: str, batch: int, reps: int, tiles: list[str] | tuple[str, ...]
               ) -> list[dict]:  # fmt: skip
    """The one-launch LoRA kernels under each tile configuration (set_tiles), against the
    segment kernels in the same rows: which tiles to make the default. A tile that fails (a
    compile error) gets a row with its error, and the others still run."""
    out = []
    default = None
    try:
        for tile in tiles:
            before = set_tiles(tile)
            default = default or before
            try:
                rows = lora_rows(shape, batch, reps, stages=True)
            except Exception as e:  # noqa: BLE001 - the sweep's other tiles still run
                out.append({"op": "lora_tiles", "tiles": tile, "shape": shape, "batch": batch,
                            "error": f"{type(e).__name__}: {e}"[:2000]})  # fmt: skip
                print(f"tile {tile} at {shape} batch {batch} failed: {out[-1]['error']}",
                      file=sys.stderr)  # fmt: skip
                continue
            out += [{**row, "op": "lora_tiles", "tiles": tile} for row in rows]
    finally:
        if default:
            set_tiles(default)
    return out


def switched_off(fn: Callable[[], None], module: object, flag: str) -> Callable[[], None]:
    """fn run with module.flag False (a kernel form timed beside the default in one run)."""

    def run() -> None:
        was = getattr(module, flag)
        setattr(module, flag, False)
        try:
            fn()
        finally:
            setattr(module, flag, was)

    return run


def lora_rows(shape: str, batch: int, reps: int, stages: bool = False) -> list[dict]:
    """The one-launch kernels against the segment ones at each module's sizes; `stages`: also
    the one-launch shrink and expand timed apart (stage_graph_ms: which kernel a tile helps)."""
    from peftserve.kernels import triton_lowrank_rows as rows_module
    from peftserve.kernels.triton_expand import launch_expand
    from peftserve.kernels.triton_lowrank_rows import expand_rows_triton
    from peftserve.kernels.triton_lowrank_stages import lowrank_delta_rows_triton, shrink_stage
    from peftserve.kernels.triton_shrink import launch_shrink

    rows = []
    token_slot = lora_token_slots(batch)
    meta = build_segment_meta(token_slot)  # built once per step by the runner: not timed
    for module, (d_in, slices) in lora_modules(shape).items():
        rank, A, B, scale, x = lora_weights(d_in, slices, batch)
        y = torch.zeros(batch, sum(slices), device=DEV, dtype=DTYPE)

        def segments(y=y, x=x, A=A, B=B, rank=rank, scale=scale, slices=slices) -> None:
            launch_expand(y, launch_shrink(x, A, rank, meta, None, None), B, rank, scale, meta,
                          slices, None)  # fmt: skip

        def per_token(y=y, x=x, A=A, B=B, rank=rank, scale=scale, slices=slices) -> None:
            lowrank_delta_rows_triton(y, x, A, B, rank, scale, token_slot, slices)

        methods = {"rows_one_launch": per_token, "segments": segments}
        if len(set(slices)) > 1:  # the expand's grid before FLAT_TILES, in the same run
            methods["rows_widest_grid"] = switched_off(per_token, rows_module, "FLAT_TILES")
        # the expand's ranks read by slot, as before TOKEN_RANKS
        methods["rows_rank_by_slot"] = switched_off(per_token, rows_module, "TOKEN_RANKS")
        outs = []
        for fn in methods.values():
            y.zero_()
            fn()
            outs.append(y.float().clone())
        moved = (lora_weight_elements(token_slot, d_in, slices)
                 + batch * (d_in + 2 * sum(slices))) * 2  # fmt: skip
        diff = float((outs[0] - outs[1]).abs().max())
        extra: dict = {"module": module, "d_in": d_in, "slices": list(slices), "r_max": R_MAX}
        if stages:
            v, ranks = shrink_stage(x, A, rank, token_slot)
            timed = {
                "shrink": time_ms(lambda x=x, A=A, rank=rank: shrink_stage(
                    x, A, rank, token_slot), reps),
                "expand": time_ms(lambda y=y, v=v, B=B, rank=rank, scale=scale, slices=slices,
                                  ranks=ranks: expand_rows_triton(
                    y, v, B, rank, scale, token_slot, slices, token_rank=ranks), reps),
            }  # fmt: skip
            extra["stage_graph_ms"] = {k: t[1] for k, t in timed.items()}
            extra["stage_ms"] = {k: t[0] for k, t in timed.items()}
        rows.append(_row("lora", shape, batch, methods, reps, moved, diff, extra))
    return rows


def overlap_rows(shape: str, batch: int, reps: int) -> list[dict]:
    """Each module's base matmul with its LoRA deltas (32 slots, as lora_rows), in the forms
    config.lora_overlap chooses between, as TritonBackend runs them for the engine: after the
    matmul ("off"), the shrink on a second stream beside it ("shrink"), the whole delta there
    and one add after it ("delta"), next to the matmul alone: how much of the LoRA work the
    matmul hides, module by module."""
    side = torch.cuda.Stream() if DEV.startswith("cuda") else None
    tri = TritonBackend()  # no tile table: the kernels' defaults, as lora_rows
    rows = []
    token_slot = lora_token_slots(batch)
    for module, (d_in, slices) in lora_modules(shape).items():
        rank, A, B, scale, x = lora_weights(d_in, slices, batch)
        W = torch.randn(sum(slices), d_in, device=DEV, dtype=DTYPE) * 0.02

        def matmul(x=x, W=W) -> torch.Tensor:
            return torch.nn.functional.linear(x, W)

        def after(x=x, W=W, A=A, B=B, rank=rank, scale=scale, slices=slices) -> torch.Tensor:
            y = matmul(x, W)
            tri.lowrank_delta_tokens(y, x, A, B, rank, scale, token_slot, slices)
            return y

        def beside(whole: bool, x=x, W=W, A=A, B=B, rank=rank, scale=scale, slices=slices
                   ) -> torch.Tensor:  # fmt: skip
            begun = tri.lowrank_begin_tokens(x, A, B, rank, scale, token_slot, slices, side,
                                             whole=whole)  # fmt: skip
            y = matmul(x, W)
            tri.lowrank_end_tokens(y, begun, B, rank, scale, token_slot, slices, side)
            return y

        methods = {"matmul_alone": matmul, "lora_after": after,
                   "shrink_beside": functools.partial(beside, False),
                   "delta_beside": functools.partial(beside, True)}  # fmt: skip
        want = after().float()
        diff = max(float((methods[m]().float() - want).abs().max())
                   for m in ("shrink_beside", "delta_beside"))  # fmt: skip
        lora = lora_weight_elements(token_slot, d_in, slices)
        moved = (W.numel() + lora + batch * (d_in + 2 * sum(slices))) * 2
        rows.append(_row("overlap", shape, batch, methods, reps, moved, diff,
                         {"module": module, "d_in": d_in, "slices": list(slices)}))
    return rows


def lora_token_slots(batch: int) -> torch.Tensor:
    """Each of `batch` tokens in a random one of the N_SLOTS slots (seeded by the batch)."""
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, N_SLOTS, (batch,), generator=g).to(DEV)


def lora_weights(d_in: int, slices: tuple[int, ...], batch: int
                 ) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """A module's slot buffers (slot s at rank SLOT_RANKS[s] on every slice) and an input:
    (rank, A, B, scale, x)."""
    n = len(slices)
    rank = torch.tensor(SLOT_RANKS, dtype=torch.int32)
    A = torch.randn(n, N_SLOTS, R_MAX, d_in, device=DEV, dtype=DTYPE) * 0.02
    B = torch.randn(N_SLOTS, sum(slices), R_MAX, device=DEV, dtype=DTYPE) * 0.02
    scale = torch.full((n, N_SLOTS), 2.0, device=DEV)
    x = torch.randn(batch, d_in, device=DEV, dtype=DTYPE)
    return rank.repeat(n, 1).contiguous().to(DEV), A, B, scale, x


def lora_weight_elements(token_slot: torch.Tensor, d_in: int, slices: tuple[int, ...]) -> int:
    """The adapter weights a step reads: each slot in use, at its exact rank, an A per slice
    (a fused projection's q, k and v each have their own) and B's rows of every slice."""
    used = sorted(set(token_slot.tolist()))
    return sum(SLOT_RANKS[s] * (len(slices) * d_in + sum(slices)) for s in used)


def lora_modules(shape: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The adapted projections of a layer: (in, its output slices), qkv and gate_up fused."""
    heads, kv_heads, D, hidden, inter = SHAPES[shape]
    return {
        "qkv": (hidden, (heads * D, kv_heads * D, kv_heads * D)),
        "o": (heads * D, (hidden,)),
        "gate_up": (hidden, (inter, inter)),
        "down": (inter, (hidden,)),
    }


_COMPILED: dict[str, Callable] = {}  # one torch.compile per op, for every shape and batch


def fused_rows(shape: str, batch: int, reps: int) -> list[dict]:
    """Residual add + RMSNorm, rotary + K/V write, SiLU-and-mul: the Triton kernels, Inductor's
    compile of the reference's torch code, and that code eager."""
    heads, kv_heads, D, hidden, inter = SHAPES[shape]
    dev = DEV
    ref, tri = Backend(), TritonBackend()
    dt, eps = DTYPE, 1e-5
    g = torch.Generator(device=dev).manual_seed(batch)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=dev, dtype=dt, generator=g)

    angle = torch.rand(batch, 1, D // 2, device=dev, generator=g) * 6.28
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(dt)
    sin = torch.cat((angle.sin(), angle.sin()), -1).to(dt)
    slots = batch * 64
    cache = torch.zeros(2, kv_heads, slots, D, device=dev, dtype=dt)
    slot_mapping = torch.randperm(slots, device=dev, generator=g)[:batch]
    qkv = randn(batch, (heads + 2 * kv_heads) * D)
    ops = {  # name: (arguments, bytes a call must read and write)
        "add_rms_norm": ((randn(batch, hidden), randn(batch, hidden), randn(hidden), eps),
                         2 * 4 * batch * hidden),
        "rotary_and_cache": ((qkv, cos, sin, cache, slot_mapping, heads, kv_heads),
                             2 * batch * (2 * (heads + 2 * kv_heads) * D + 2 * D)),
        "silu_and_mul": ((randn(batch, 2 * inter),), 2 * batch * 3 * inter),
    }  # fmt: skip
    rows = []
    for name, (args, moved) in ops.items():
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(getattr(ref, name), dynamic=True, fullgraph=True)
        # the first call at these sizes: compiling where torch.compile needs to (the first
        # call, batch 1's specialization, another shape's constants), its guards otherwise
        sync()
        start = time.perf_counter()
        _COMPILED[name](*args)
        sync()
        first_call_s = time.perf_counter() - start
        methods = {"triton": functools.partial(getattr(tri, name), *args),
                   "inductor": functools.partial(_COMPILED[name], *args),
                   "torch": functools.partial(getattr(ref, name), *args)}
        saved = qkv.clone()  # the Triton rotary turns q, k in place: each method from the same
        outs = {}
        for method, fn in methods.items():
            qkv.copy_(saved)
            out = fn()
            outs[method] = [t.float().clone() for t in (out if isinstance(out, tuple) else (out,))]
        qkv.copy_(saved)
        diff = {m: max(float((a - b).abs().max()) for a, b in zip(o, outs["torch"], strict=True))
                for m, o in outs.items()}  # fmt: skip
        rows.append(_row("fused", shape, batch, methods, reps, moved, diff["triton"],
                         {"module": name, "max_abs_diff_inductor": diff["inductor"],
                          "inductor_first_call_s": first_call_s}))  # fmt: skip
    return rows


def _row(op: str, shape: str, batch: int, methods: dict, reps: int, moved: int, diff: float,
         extra: dict) -> dict:  # fmt: skip
    timed = {name: time_ms(fn, reps) for name, fn in methods.items()}
    row = {
        "op": op, "shape": shape, "batch": batch, **extra,
        "ms": {name: t[0] for name, t in timed.items()},
        "graph_ms": {name: t[1] for name, t in timed.items()},
        "gbs_graph": {name: moved / t[1] / 1e6 if t[1] else None for name, t in timed.items()},
        "bytes": moved,
        "max_abs_diff": diff,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--ops", default="attention,lora", help="and/or fused, overlap")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        default=["smollm2-135m", "llama-3.1-8b"])  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cpu: a dry run")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--lora-tiles", nargs="*", default=None, metavar="N:W:K:W[:RC[:P[:RG]]]",
                        help="only the one-launch LoRA kernels, under each of these tiles "
                             "(expand BLOCK_N:num_warps:shrink BLOCK_K:num_warps[:rank "
                             "chunk[:shrink programs[:shrink ranks a program]]]), e.g. "
                             "64:4:128:4 64:4:128:4:16 64:4:128:4:0:2048:16; none given: "
                             "SWEEP_TILES")  # fmt: skip
    args = parser.parse_args()
    ops = set(args.ops.split(","))
    if not ops <= {"attention", "lora", "fused", "overlap"}:
        parser.error(f"--ops: attention, lora, fused, overlap; got {args.ops}")
    global DEV, DTYPE
    DEV, DTYPE = args.device, getattr(torch, args.dtype)
    cuda = DEV.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("decode_kernels.py needs a CUDA device (--device cpu: a dry run)")
    src = torch.empty(1 << (30 if cuda else 26), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    copy_gbs = 2 * src.numel() * 10 / (time.perf_counter() - start) / 1e9
    del src, dst
    rows = []
    for shape in args.shapes:
        for batch in args.batches:
            if args.lora_tiles is not None:
                rows += lora_tiles(shape, batch, args.reps, args.lora_tiles or SWEEP_TILES)
                continue
            if "attention" in ops:
                rows.append(attention_row(shape, batch, args.reps))
            if "lora" in ops:
                rows += lora_rows(shape, batch, args.reps)
            if "fused" in ops:
                rows += fused_rows(shape, batch, args.reps)
            if "overlap" in ops:
                rows += overlap_rows(shape, batch, args.reps)
            if cuda:
                torch.cuda.empty_cache()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or DEV,
        "torch": torch.__version__,
        "device_copy_gbs": copy_gbs,
        "setup": {"dtype": args.dtype, "block_size": BLOCK_SIZE, "max_ctx": MAX_CTX,
                  "slots": N_SLOTS, "r_max": R_MAX, "ranks": RANKS,
                  "shapes": {name: SHAPES[name] for name in args.shapes},
                  "graph_calls": GRAPH_CALLS},  # fmt: skip
        "rows": rows,
    }
    name = {"fused": "decode_fused_ops_cuda.json", "overlap": "decode_overlap_cuda.json"}.get(
        ",".join(sorted(ops)), "decode_kernels_cuda.json")
    if args.lora_tiles is not None:
        name = "decode_lora_tiles_cuda.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
