"""The token-by-token Triton low-rank kernels (triton_lowrank_rows.py, run by
triton_lowrank_stages.py; interpreted when there is no GPU) against reference.py: mixed exact
ranks, rank 0 on a slice, tokens without an adapter (slot -1, NaN inputs), fused projections'
slices, split shrinks, bottleneck epilogues."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels import triton_lowrank_rows as rows_module
from peftserve.kernels.checks import check_rows_args
from peftserve.kernels.lora_tiles import Tiles, TileTable
from peftserve.kernels.triton_lowrank_rows import shrink_rows_triton, shrink_splits
from peftserve.kernels.triton_lowrank_stages import lowrank_delta_rows_triton, shrink_stage
from peftserve.layers.triton_backend import TritonBackend
from tests.kernels.lowrank_cases import (
    BF16_TOL,
    FP16_TOL,
    FP32_TOL,
    KERNEL_DEVICE,
    assert_close,
    assert_untouched_rows,
    make_case,
    reference_v,
    reference_y,
)

QKV_GQA = (48, 16, 16)  # q, k, v widths under grouped-query attention
GATE_UP = (70, 70)


@pytest.fixture(autouse=True, params=[(0, 0), (4, 0), (16, 0), (0, 4)],
                ids=["whole-rank", "rank-chunk-4", "rank-chunk-16", "shrink-rank-grid-4"])
def rank_chunk(request, monkeypatch):
    """Every test in every form of the kernels: one tile of every rank up to R_max, loops over
    each slot's own rank in chunks (RANK_CHUNK), and a shrink whose programs take 4 ranks each
    (SHRINK_RANK_GRID): what --lora-tiles times on the GPU."""
    chunk, grid = request.param
    monkeypatch.setattr(rows_module, "RANK_CHUNK", chunk)
    monkeypatch.setattr(rows_module, "SHRINK_RANK_GRID", grid)
    return chunk


def case(**kwargs):
    kwargs.setdefault("device", KERNEL_DEVICE)
    return make_case(**kwargs)


def run(c, **kwargs):
    y = c.y.clone()
    lowrank_delta_rows_triton(y, c.x, c.A, c.B, c.rank, c.scale, c.meta.token_slot,
                              c.slice_sizes, **c.bias_kwargs, **kwargs)  # fmt: skip
    return y


@pytest.mark.parametrize(
    "slice_sizes, max_rank, n_tokens, n_slots, layout",
    [
        (QKV_GQA, 16, 9, 12, "decode"),  # one token per slot, ranks 1..16
        (GATE_UP, 64, 8, 5, "random"),  # several tokens per slot, unsorted
        ((33,), 1, 5, 4, "random"),  # rank 1, one slice
        ((24, 8, 8), 128, 4, 3, "random"),  # rank 128: BLOCK_R 256 over R_max 133
    ],
)
def test_lora_matches_reference(slice_sizes, max_rank, n_tokens, n_slots, layout):
    dtype, atol, rtol = FP32_TOL
    c = case(n_tokens=n_tokens, d_in=73, slice_sizes=slice_sizes, n_slots=n_slots,
             max_rank=max_rank, dtype=dtype, layout=layout)  # fmt: skip
    y = run(c)
    assert_close(y, reference_y(c), atol, rtol)
    assert_untouched_rows(y, c.y, c.token_slot)


@pytest.mark.parametrize("dtype, atol, rtol", [FP16_TOL, BF16_TOL])
def test_half_precision_matches_reference(dtype, atol, rtol):
    c = case(n_tokens=7, d_in=73, slice_sizes=QKV_GQA, n_slots=6, max_rank=32, dtype=dtype)
    y = run(c)
    assert_close(y, reference_y(c), atol, rtol)
    assert_untouched_rows(y, c.y, c.token_slot)


@pytest.mark.parametrize("n_splits", [1, 3])
def test_split_shrink_sums_to_reference(n_splits):
    """Input columns split over programs (300 = 3 x 128 - 84: a ragged last split); each
    entry written, zeros past each token's rank and for tokens without an adapter."""
    c = case(n_tokens=6, d_in=300, slice_sizes=QKV_GQA, n_slots=4, max_rank=16)
    v = shrink_rows_triton(c.x, c.A, c.rank, c.meta.token_slot, n_splits)
    assert v.shape == (n_splits, 3, 6, 21)
    assert not v.isnan().any()
    assert_close(v.sum(0), reference_v(c), *FP32_TOL[1:])


@pytest.mark.parametrize("act, d_in", [("relu", 64), ("silu", 700), ("gelu", 64)])  # 700: split
def test_bottleneck_matches_reference(act, d_in):
    c = case(n_tokens=6, d_in=d_in, slice_sizes=(d_in,), n_slots=4, max_rank=16,
             bottleneck=act)  # fmt: skip
    assert shrink_splits(6, 1, d_in) == (1 if d_in == 64 else 2)
    y = run(c)
    assert_close(y, reference_y(c), *FP32_TOL[1:])
    assert_untouched_rows(y, c.y, c.token_slot)


def test_the_shrink_splits_aim_at_its_program_count(monkeypatch):
    from peftserve.kernels import triton_lowrank_rows

    # 8B's down projection at batch 32: 256 programs -> 8 splits, 2048 -> 56 (two BLOCK_Ks each)
    assert shrink_splits(32, 1, 14336) == 8
    monkeypatch.setattr(triton_lowrank_rows, "SHRINK_PROGRAMS", 2048)
    assert shrink_splits(32, 1, 14336) == 56
    assert shrink_splits(32, 3, 4096) == 16  # qkv: capped by two BLOCK_Ks of 4096 columns
    c = case(n_tokens=6, d_in=700, slice_sizes=QKV_GQA, n_slots=4, max_rank=16)
    assert shrink_splits(6, 3, 700) == 2
    y = run(c)
    assert_close(y, reference_y(c), *FP32_TOL[1:])


def test_the_expand_over_each_slices_own_tiles_equals_the_grid_of_the_widest(monkeypatch):
    """FLAT_TILES: slices of unequal widths (qkv under GQA) launch only their own column
    tiles, each program's slice worked out from its id and the slices' bounds (two or three
    slices, the widest first or not); the same sums, bit for bit, as every slice at the widest
    one's tile count (the flat form runs in every other test with QKV_GQA too)."""
    from peftserve.kernels.triton_lowrank_rows import flat_bounds

    widths = (150, 40, 40)  # 3 + 1 + 1 tiles of 64 columns, against 3 x 3
    assert flat_bounds(widths, 64) == (5, (3, 4, 150, 190, 230))
    assert flat_bounds((150, 40), 64) == (4, (3, 4, 150, 190, 190))  # no third slice
    launches = spy_launches(monkeypatch)
    for sizes in (widths, (150, 40), (40, 150, 90)):
        c = case(n_tokens=5, d_in=40, slice_sizes=sizes, n_slots=3, max_rank=16)
        got = {}
        launches.clear()
        for flat in (True, False):
            monkeypatch.setattr(rows_module, "FLAT_TILES", flat)
            got[flat] = run(c)
        tiles = sum(-(-n // 64) for n in sizes)
        assert [grid for kernel, grid, _ in launches if kernel == "expand"] == [
            (5, tiles, 1), (5, len(sizes), -(-max(sizes) // 64))]  # fmt: skip
        assert torch.equal(got[True], got[False]), sizes
        assert_close(got[True], reference_y(c), *FP32_TOL[1:])
        assert_untouched_rows(got[True], c.y, c.token_slot)


def test_no_adapter_anywhere_leaves_y_untouched():
    c = case(n_tokens=5, d_in=40, slice_sizes=GATE_UP, n_slots=3, max_rank=8)
    idle = torch.full_like(c.meta.token_slot, -1)
    y = c.y.clone()
    lowrank_delta_rows_triton(y, c.x, c.A, c.B, c.rank, c.scale, idle, c.slice_sizes)
    assert torch.equal(y, c.y)


def test_backend_takes_rows_at_decode_and_segments_beyond():
    """TritonBackend.lowrank_delta: the token-by-token kernels up to rows_max_tokens, the
    segment kernels past it, the same deltas; lowrank_delta_tokens reads only token_slot."""
    c = case(n_tokens=8, d_in=73, slice_sizes=QKV_GQA, n_slots=6, max_rank=16)
    expected = reference_y(c)
    for rows_max in (8, 7):
        y = c.y.clone()
        TritonBackend(rows_max_tokens=rows_max).lowrank_delta(
            y, c.x, c.A, c.B, c.rank, c.scale, c.meta, c.slice_sizes
        )
        assert_close(y, expected, *FP32_TOL[1:])
    y = c.y.clone()
    TritonBackend().lowrank_delta_tokens(y, c.x, c.A, c.B, c.rank, c.scale,
                                         c.meta.token_slot.long(), c.slice_sizes)  # fmt: skip
    assert_close(y, expected, *FP32_TOL[1:])


def test_checks_name_the_wrong_layout():
    c = case(n_tokens=4, d_in=16, slice_sizes=GATE_UP, n_slots=3, max_rank=4)
    args = (c.y, c.x, c.A, c.B, c.rank, c.scale)
    check_rows_args(*args, c.meta.token_slot, c.slice_sizes)
    with pytest.raises(ValueError, match="token_slot"):
        check_rows_args(*args, c.meta.token_slot[:3], c.slice_sizes)
    with pytest.raises(ValueError, match="B must be"):
        check_rows_args(*args, c.meta.token_slot, (70, 69))
    with pytest.raises(ValueError, match="int32"):
        check_rows_args(c.y, c.x, c.A, c.B, c.rank.long(), c.scale, c.meta.token_slot,
                        c.slice_sizes)  # fmt: skip


class SpiedKernel:
    """Stands in for a @triton.jit kernel: each launch's grid and constexprs recorded in
    `launches` as (name, grid, kwargs), then launched."""

    def __init__(self, name: str, kernel, launches: list) -> None:
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def spy_launches(monkeypatch) -> list[tuple[str, tuple, dict]]:
    launches: list[tuple[str, tuple, dict]] = []
    for name, attr in (("shrink", "_shrink_rows_kernel"), ("expand", "_expand_rows_kernel")):
        monkeypatch.setattr(rows_module, attr,
                            SpiedKernel(name, getattr(rows_module, attr), launches))  # fmt: skip
    return launches


def tiles_of(launches: list[tuple[str, tuple, dict]]) -> list[tuple]:
    """The tiles each launch ran with: ("shrink", its splits, warps), ("expand", its block)."""
    return [("shrink", grid[2] // rank_groups(kw), kw["num_warps"]) if name == "shrink"
            else ("expand", kw["BLOCK_N"]) for name, grid, kw in launches]  # fmt: skip


def rank_groups(kw: dict) -> int:
    """A shrink launch's programs a (token, slice, split): its slot's ranks spread over
    programs of RANK_GRID ranks each, or one program for them all."""
    return kw["BLOCK_R"] // kw["RANK_GRID"] if kw["RANK_GRID"] else 1


def test_a_launch_given_tiles_runs_them(monkeypatch):
    """Tiles passed in (a tuned table's, lora_tiles.py) replace the defaults in both kernels:
    the shrink's programs set its splits, the expand's block its column tiles; the sums stay
    the reference's."""
    seen = spy_launches(monkeypatch)
    c = case(n_tokens=6, d_in=700, slice_sizes=QKV_GQA, n_slots=4, max_rank=16)
    y = run(c)
    # 256 programs over 6 tokens x 3 slices: 2 splits (700 columns: at most 2); with 4 ranks a
    # program, x 8 rank groups (R_max 21): 1
    splits = 1 if rows_module.SHRINK_RANK_GRID else 2
    assert tiles_of(seen) == [("shrink", splits, rows_module.SHRINK_WARPS), ("expand", 64)]
    assert_close(y, reference_y(c), *FP32_TOL[1:])
    seen.clear()
    tuned = (Tiles(32, 2, 4, 64), Tiles(16, 2, 8))  # 64 programs over 6 x 3: 3 splits
    y = run(c, tiles=tuned)
    assert tiles_of(seen) == [("shrink", 3, 2), ("expand", 16)]
    assert_close(y, reference_y(c), *FP32_TOL[1:])
    assert_untouched_rows(y, c.y, c.token_slot)


def test_the_backend_launches_its_tables_tiles_for_the_module_and_batch(monkeypatch):
    """TritonBackend picks each launch's tiles from its TileTable by the module's shape, max
    rank and batch; a shape the table lacks keeps the defaults."""
    c = case(n_tokens=6, d_in=700, slice_sizes=QKV_GQA, n_slots=4, max_rank=16)
    entry = {"in": 700, "slices": list(QKV_GQA), "r_max": int(c.A.shape[2]), "rank_chunk": 0}
    table = TileTable.from_entries([
        {**entry, "kernel": "shrink", "batch": 4, "block": 32, "warps": 2, "programs": 64},
        {**entry, "kernel": "expand", "batch": 4, "block": 32, "warps": 2},
        {**entry, "kernel": "expand", "batch": 64, "block": 128, "warps": 8},
    ])  # fmt: skip
    seen = spy_launches(monkeypatch)
    for kind in ("lowrank_delta", "lowrank_delta_tokens"):
        y = c.y.clone()
        backend = TritonBackend(lora_tiles=table)
        if kind == "lowrank_delta":
            backend.lowrank_delta(y, c.x, c.A, c.B, c.rank, c.scale, c.meta, c.slice_sizes)
        else:
            backend.lowrank_delta_tokens(y, c.x, c.A, c.B, c.rank, c.scale,
                                         c.meta.token_slot.long(), c.slice_sizes)  # fmt: skip
        assert tiles_of(seen) == [("shrink", 3, 2), ("expand", 32)], kind
        assert_close(y, reference_y(c), *FP32_TOL[1:])
        seen.clear()
    other = case(n_tokens=6, d_in=64, slice_sizes=QKV_GQA, n_slots=4, max_rank=16)
    y = other.y.clone()
    TritonBackend(lora_tiles=table).lowrank_delta(y, other.x, other.A, other.B, other.rank,
                                                  other.scale, other.meta, other.slice_sizes)
    assert tiles_of(seen) == [("shrink", 1, rows_module.SHRINK_WARPS), ("expand", 64)]
    # a table entry whose shrink programs take 8 ranks each (rank_grid): 4 groups (R_max 21)
    seen.clear()
    grid = TileTable.from_entries([{**entry, "kernel": "shrink", "batch": 8, "block": 32,
                                    "warps": 2, "programs": 64, "rank_grid": 8}])  # fmt: skip
    y = c.y.clone()
    TritonBackend(lora_tiles=grid).lowrank_delta_tokens(y, c.x, c.A, c.B, c.rank, c.scale,
                                                        c.meta.token_slot.long(), c.slice_sizes)
    assert [kw["RANK_GRID"] for name, _, kw in seen if name == "shrink"] == [8]
    assert tiles_of(seen)[0] == ("shrink", 1, 2)  # 64 programs over 6 x 3 x 4 groups: 1 split
    assert_close(y, reference_y(c), *FP32_TOL[1:])


@pytest.mark.parametrize("whole", [False, True], ids=["shrink-first", "delta-first"])
def test_the_backends_two_halves_give_the_one_calls_sums_bit_for_bit(monkeypatch, whole):
    """lowrank_begin_tokens then lowrank_end_tokens (config.lora_overlap, stream-less here)
    add what lowrank_delta_tokens adds, with the table's tiles in both halves, whether the
    first half is the shrink or (`whole`) the shrink and the expand into a float32 delta of
    their own that the second adds to y; an end handed a y of other rows is refused before
    any launch."""
    # fp32: in half precision the two forms round y + delta to y's dtype once each, in the
    # kernel and in add_, which the interpreter does apart (it truncates to bf16, torch and the
    # GPU round to nearest)
    c = case(n_tokens=6, d_in=700, slice_sizes=QKV_GQA, n_slots=4, max_rank=16)
    entry = {"in": 700, "slices": list(QKV_GQA), "r_max": int(c.A.shape[2]), "rank_chunk": 0,
             "batch": 8, "warps": 2}  # fmt: skip
    table = TileTable.from_entries([{**entry, "kernel": "shrink", "block": 32, "programs": 64},
                                    {**entry, "kernel": "expand", "block": 16}])  # fmt: skip
    backend = TritonBackend(lora_tiles=table)
    slots = c.meta.token_slot.long()
    y = c.y
    one_call = y.clone()
    backend.lowrank_delta_tokens(one_call, c.x, c.A, c.B, c.rank, c.scale, slots, c.slice_sizes)
    halves = y.clone()
    seen = spy_launches(monkeypatch)
    begun = backend.lowrank_begin_tokens(c.x, c.A, c.B, c.rank, c.scale, slots, c.slice_sizes,
                                         whole=whole)  # fmt: skip
    if whole:
        assert begun.d.dtype == torch.float32 and begun.d.shape == y.shape
        assert not begun.d[c.meta.token_slot < 0].any()  # no adapter: a zero delta
    else:
        assert begun[0][0].shape[0] == 3 and begun[1] == Tiles(16, 2, 0)  # the table's tiles
    backend.lowrank_end_tokens(halves, begun, c.B, c.rank, c.scale, slots, c.slice_sizes)
    assert tiles_of(seen) == [("shrink", 3, 2), ("expand", 16)]
    assert torch.equal(halves, one_call) and not torch.equal(halves, y)
    assert_close(halves, reference_y(c), *FP32_TOL[1:])
    assert_untouched_rows(halves, y, c.token_slot)
    with pytest.raises(ValueError, match="y must be"):
        backend.lowrank_end_tokens(halves[:5], begun, c.B, c.rank, c.scale, slots,
                                   c.slice_sizes)  # fmt: skip
    with pytest.raises(ValueError, match="token_slot"):
        backend.lowrank_begin_tokens(c.x, c.A, c.B, c.rank, c.scale, slots[:5], c.slice_sizes,
                                     whole=whole)  # fmt: skip


@pytest.mark.parametrize("bottleneck", [False, True], ids=["lora", "bottleneck"])
def test_the_expand_reading_the_shrinks_ranks_equals_it_reading_the_slots(monkeypatch,
                                                                          bottleneck):  # fmt: skip
    """TOKEN_RANKS: the shrink writes each (slice, token)'s rank (clamped to R_max, 0 for a
    token without an adapter or a slice the adapter leaves out) and the expand reads it there
    instead of by slot: the same sums bit for bit, rank-0 slices and idle tokens included."""
    # (make_case: slot 1 has rank 0 on slice 0, about a fifth of the tokens no adapter)
    c = case(n_tokens=9, d_in=150, slice_sizes=(64,) if bottleneck else QKV_GQA, n_slots=5,
             max_rank=16, bottleneck="silu" if bottleneck else None)  # fmt: skip
    assert (c.meta.token_slot < 0).any() and (c.meta.token_slot == 1).any()
    got = {}
    for by_token in (True, False):
        monkeypatch.setattr(rows_module, "TOKEN_RANKS", by_token)
        got[by_token] = run(c)
    assert torch.equal(got[True], got[False])
    assert_close(got[True], reference_y(c), *FP32_TOL[1:])
    assert_untouched_rows(got[True], c.y, c.token_slot)
    monkeypatch.setattr(rows_module, "TOKEN_RANKS", True)
    v, ranks = shrink_stage(c.x, c.A, c.rank, c.meta.token_slot)
    slots = c.meta.token_slot.long().cpu()
    want = torch.where(slots >= 0, c.rank.cpu()[:, slots.clamp(min=0)], 0).clamp(max=c.A.shape[2])
    assert ranks.dtype == torch.int32 and torch.equal(ranks.cpu(), want.int())


@pytest.mark.parametrize("grid", [4, 16])
def test_a_shrink_whose_programs_take_a_few_ranks_each_gives_the_same_sums(monkeypatch, grid):
    """SHRINK_RANK_GRID: each (token, slice, split)'s ranks over programs of `grid` ranks, those
    wholly past the slot's rank writing zeros; the same partial sums bit for bit as the loop
    over the rank in chunks of as many (RANK_CHUNK: the same A tiles, the same order), the
    ranks for the expand too, each rank group counted among the programs the splits aim at."""
    c = case(n_tokens=6, d_in=700, slice_sizes=QKV_GQA, n_slots=4, max_rank=21)  # R_max 21
    seen = spy_launches(monkeypatch)
    got = {}
    for tiles in (Tiles(128, 4, grid, 64), Tiles(128, 4, 0, 64, grid)):
        ranks = torch.empty(3, 6, dtype=torch.int32, device=c.x.device)
        v = shrink_rows_triton(c.x, c.A, c.rank, c.meta.token_slot, 2, tiles, ranks_out=ranks)
        got[tiles.rank_grid] = (v, ranks)
    assert torch.equal(got[0][0], got[grid][0]) and torch.equal(got[0][1], got[grid][1])
    assert not got[grid][0].isnan().any()
    assert_close(got[grid][0].sum(0), reference_v(c), *FP32_TOL[1:])
    groups = 32 // grid  # BLOCK_R 32 over R_max 21
    assert [g for _, g, _ in seen] == [(6, 3, 2), (6, 3, 2 * groups)]
    # 8B's qkv at batch 32: 2048 programs over 32 tokens x 3 slices x 4 rank groups: 5 splits
    assert shrink_splits(32, 3, 4096, Tiles(128, 4, 0, 2048, 16), r_max=64) == 5
    assert shrink_splits(32, 3, 4096, Tiles(128, 4, 0, 2048), r_max=64) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bottleneck", [None, "silu"])
def test_the_expand_writing_its_delta_gives_its_sum_into_zeros_bit_for_bit(dtype, bottleneck):
    """add=False (delta_stage: no zero fill before the expand): every entry of y written, the
    delta where a token's slot has a rank on the slice, zero where it has none (slot -1, rank 0
    on a slice), the same values bit for bit as the expand adding into zeros."""
    from peftserve.kernels.triton_lowrank_rows import expand_rows_triton

    c = case(n_tokens=7, d_in=700, slice_sizes=QKV_GQA, n_slots=4, max_rank=16, dtype=dtype,
             bottleneck=bottleneck)  # fmt: skip
    v = shrink_rows_triton(c.x, c.A, c.rank, c.meta.token_slot, 2)
    kw = {"b_down": c.b_down, "b_up": c.b_up, "act": bottleneck} if bottleneck else {}
    into_zeros = expand_rows_triton(torch.zeros_like(c.y), v, c.B, c.rank, c.scale,
                                    c.meta.token_slot, c.slice_sizes, **kw)  # fmt: skip
    written = expand_rows_triton(torch.full_like(c.y, float("nan")), v, c.B, c.rank, c.scale,
                                 c.meta.token_slot, c.slice_sizes, add=False, **kw)  # fmt: skip
    assert torch.equal(written, into_zeros)
    assert not written[c.meta.token_slot < 0].any()  # no adapter: zeros, not the NaN left there
    assert written[c.meta.token_slot == 1, : QKV_GQA[0]].eq(0).all()  # slot 1: rank 0 on q
    assert written[c.meta.token_slot == 0].ne(0).any()
