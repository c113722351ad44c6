"""CPU path of the low-rank delta: grouped torch matmuls over the active slots.

Arguments are checked by the caller (`dispatch.py`). Two layouts, chosen per call from host ints
in `SegmentMeta`, so nothing waits on a device:

- by segment: two matmuls per (active slot, slice) on the slot's exact rank. Each pair costs
  about five small torch ops (~20 us), independent of rows: right for prefill (few segments, many
  rows each).
- padded: the active rows scattered into [span, max_seg_len, in] over the slot span
  `lo..hi` and one batched matmul per slice and stage against views such as `A[i, lo:hi, :r_hi]`
  (no weight copy), ranks masked after the shrink. It pays for padding (ranks up to the largest
  active rank, slots of the span without tokens) but issues O(n_slices) ops whatever the slot
  count: right for decode, where every slot has one row.

bench/kernels.py measures both (bench/results/kernels_cpu.json). At SmolLM2-135M sizes with 32
adapters of ranks 8-64: decode (one row per slot) runs padded up to 2.5x (fp32) and 7x (bf16)
faster than by segment or than per-adapter sub-batches (PEFT's way), least on gate/up and down,
which are bound by reading the weights; prefill (8 segments of 64 rows) runs by segment 1.1-1.9x
faster than per-adapter sub-batches and 2-5x faster than padded.

Both compute in the activations' dtype (so bf16 rounds v to bf16, as PEFT does); `lora_shrink`
stores v as float32. The padded layout multiplies weight storage past a slot's rank by exact
zeros, so that storage must hold finite values (the engine zero-fills slot buffers); the Triton
kernels never read it. Ranks outside 0..R_max raise ValueError here (the Triton path clamps, since
checking would need a device sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .activation import activation_fn
from .segment_meta import SegmentMeta

# Padded layout when its rows (span * max_seg_len) are at most this many times the real rows
# and there are more segments than the by-segment loop handles cheaply.
_PAD_ROW_RATIO = 2
_MIN_SEGMENTS_FOR_PADDED = 3


def use_padded_layout(meta: SegmentMeta, live_segments: int | None = None) -> bool:
    """`live_segments`: how many of the step's segments have weights on this module (the step's
    meta spans every adapter of the batch; a module that only some of them adapt loops over
    just those in the by-segment layout). None: all of them."""
    lo, hi = meta.slot_span
    rows = (hi - lo) * meta.max_seg_len
    live = meta.num_segments if live_segments is None else live_segments
    return live >= _MIN_SEGMENTS_FOR_PADDED and rows <= _PAD_ROW_RATIO * meta.num_active_tokens


def _live_segments(ranks: list[list[int]], meta: SegmentMeta) -> int:
    return sum(1 for s in meta.seg_slots_list if any(row[s] for row in ranks))


def lowrank_layout(rank: torch.Tensor, meta: SegmentMeta) -> str:
    """The layout lowrank_delta_cpu takes for a module whose slots have ranks `rank`
    [n_slices, S]: "padded", "segments", or "none" when no segment has weights here."""
    return _layout(_active_ranks(rank, meta, int(rank.max())), meta)


def _layout(ranks: list[list[int]], meta: SegmentMeta) -> str:
    live = _live_segments(ranks, meta)
    if not live:
        return "none"
    return "padded" if use_padded_layout(meta, live) else "segments"


def shrink_cpu(
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    rank: torch.Tensor,  # [n_slices, S] int32
    meta: SegmentMeta,
    b_down: torch.Tensor | None,  # [S, R_max]
    act: str | None,
) -> torch.Tensor:  # v: [n_slices, T, R_max] float32, zero outside computed entries
    n_slices, _, r_max, _ = A.shape
    v = torch.zeros(n_slices, x.shape[0], r_max, dtype=torch.float32)
    if meta.is_empty:
        return v
    ranks = _active_ranks(rank, meta, r_max)
    xs = x.index_select(0, meta.sorted_tokens)  # [T_active, in]
    if use_padded_layout(meta):
        r_hi = _max_rank(ranks, meta)
        h = _shrink_padded(xs, A, rank, meta, r_hi, b_down, act)  # [n, span, m, r_hi]
        rows = h.flatten(1, 2).index_select(1, meta.pad_index)  # [n, T_active, r_hi]
        v[:, :, :r_hi].index_copy_(1, meta.sorted_tokens, rows.float())
        return v
    vs = torch.zeros(n_slices, xs.shape[0], r_max, dtype=torch.float32)  # sorted rows
    fn = activation_fn(act)
    for a, b, s, i, r in _segment_slices(meta, ranks):
        vs[i, a:b, :r] = _shrink_segment(xs[a:b], A[i, s, :r], b_down, s, r, fn)
    v.index_copy_(1, meta.sorted_tokens, vs)
    return v


def expand_cpu(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [n_slices, T, R_max] float32
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],
    b_up: torch.Tensor | None,  # [S, out_total]
) -> torch.Tensor:
    if meta.is_empty:
        return y
    ranks = _active_ranks(rank, meta, B.shape[2])
    vs = v.index_select(1, meta.sorted_tokens).to(y.dtype)  # [n, T_active, R_max]
    if use_padded_layout(meta):
        r_hi = _max_rank(ranks, meta)
        lo, hi = meta.slot_span
        h = vs.new_zeros(vs.shape[0], (hi - lo) * meta.max_seg_len, r_hi)
        h.index_copy_(1, meta.pad_index, vs[:, :, :r_hi])
        h = h.view(vs.shape[0], hi - lo, meta.max_seg_len, r_hi)
        h = h * _rank_mask(rank, meta, r_hi).to(h.dtype)
        _expand_padded(y, h, B, rank, scale, meta, slice_sizes, b_up)
        return y
    delta = _expand_segments(vs, B, ranks, scale, meta, slice_sizes, b_up)
    y.index_add_(0, meta.sorted_tokens, delta)
    return y


def lowrank_delta_cpu(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],
    b_down: torch.Tensor | None,  # [S, R_max]
    b_up: torch.Tensor | None,  # [S, out_total]
    act: str | None,
    padded: bool | None = None,  # force a layout (tests, bench); None = choose by shape
) -> torch.Tensor:
    if meta.is_empty:
        return y
    ranks = _active_ranks(rank, meta, A.shape[2])
    layout = _layout(ranks, meta)
    if layout == "none":  # no adapter of this step has weights on this module
        return y
    xs = x.index_select(0, meta.sorted_tokens)  # [T_active, in]
    if layout == "padded" if padded is None else padded:
        r_hi = _max_rank(ranks, meta)
        h = _shrink_padded(xs, A, rank, meta, r_hi, b_down, act)
        _expand_padded(y, h, B, rank, scale, meta, slice_sizes, b_up)
        return y
    fn = activation_fn(act)
    vs = xs.new_zeros(len(slice_sizes), xs.shape[0], A.shape[2])  # [n, T_active, R_max]
    for a, b, s, i, r in _segment_slices(meta, ranks):
        vs[i, a:b, :r] = _shrink_segment(xs[a:b], A[i, s, :r], b_down, s, r, fn)
    delta = _expand_segments(vs, B, ranks, scale, meta, slice_sizes, b_up)
    y.index_add_(0, meta.sorted_tokens, delta)
    return y


def _shrink_segment(
    xs: torch.Tensor,  # [rows, in]
    A_slot: torch.Tensor,  # [r, in]
    b_down: torch.Tensor | None,  # [S, R_max]
    slot: int,
    r: int,
    fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:  # [rows, r]
    h = F.linear(xs, A_slot, None if b_down is None else b_down[slot, :r])
    return h if fn is None else fn(h)


def _expand_segments(
    vs: torch.Tensor,  # [n_slices, T_active, R_max], y.dtype, sorted rows
    B: torch.Tensor,  # [S, out_total, R_max]
    ranks: list[list[int]],
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],
    b_up: torch.Tensor | None,  # [S, out_total]
) -> torch.Tensor:  # delta: [T_active, out_total], sorted rows
    offsets = slice_offsets(slice_sizes)
    scales = scale.tolist()
    delta = vs.new_zeros(vs.shape[1], B.shape[1])
    for a, b, s, i, r in _segment_slices(meta, ranks):
        cols = slice(offsets[i], offsets[i + 1])
        bias = None if b_up is None else b_up[s, cols]
        d = F.linear(vs[i, a:b, :r], B[s, cols, :r], bias)
        torch.mul(d, scales[i][s], out=delta[a:b, cols])
    return delta


def _shrink_padded(
    xs: torch.Tensor,  # [T_active, in], sorted rows
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    rank: torch.Tensor,  # [n_slices, S] int32
    meta: SegmentMeta,
    r_hi: int,
    b_down: torch.Tensor | None,  # [S, R_max]
    act: str | None,
) -> torch.Tensor:  # h: [n_slices, span, m, r_hi], zero past each slot's rank
    lo, hi = meta.slot_span
    m = meta.max_seg_len
    x_pad = xs.new_zeros((hi - lo) * m, xs.shape[1])
    x_pad.index_copy_(0, meta.pad_index, xs)
    x3 = x_pad.view(hi - lo, m, -1)  # [span, m, in]
    # One matmul per slice: A[:, lo:hi] folds into a single batch only when the span is all S.
    h = torch.stack([_batched_linear(x3, A[i, lo:hi, :r_hi]) for i in range(A.shape[0])])
    if b_down is not None:
        h = h + b_down[lo:hi, None, :r_hi]
    fn = activation_fn(act)
    if fn is not None:
        h = fn(h)
    return h * _rank_mask(rank, meta, r_hi).to(h.dtype)


def _expand_padded(
    y: torch.Tensor,  # [T, out_total], updated in place
    h: torch.Tensor,  # [n_slices, span, m, r_hi], zero past each slot's rank
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],
    b_up: torch.Tensor | None,  # [S, out_total]
) -> None:
    lo, hi = meta.slot_span
    r_hi = h.shape[3]
    # Rank 0 on a slice means no update there, not even the bias.
    scale_eff = torch.where(rank[:, lo:hi] > 0, scale[:, lo:hi], 0.0).to(h.dtype)
    if b_up is None:
        h = h * scale_eff[:, :, None, None]  # cheaper on h than on the wider output
    offsets = slice_offsets(slice_sizes)
    for i in range(len(slice_sizes)):
        cols = slice(offsets[i], offsets[i + 1])
        out = _batched_linear(h[i], B[lo:hi, cols, :r_hi])  # [span, m, out_i]
        if b_up is not None:
            out = (out + b_up[lo:hi, None, cols]) * scale_eff[i, :, None, None]
        rows = out.flatten(0, 1).index_select(0, meta.pad_index)  # [T_active, out_i]
        y[:, cols].index_add_(0, meta.sorted_tokens, rows)


def _batched_linear(
    inp: torch.Tensor,  # [span, m, k]
    weight: torch.Tensor,  # [span, n, k], a view into a slot buffer
) -> torch.Tensor:  # [span, m, n]
    """inp @ weight^T per batch entry. A slice of a slot buffer is a strided batch: float32 GEMMs
    read it in place, but half-precision ones copy it when it is the right operand, not when it is
    the left one (measured 1.5-2.5x on q/k/v and gate/up at SmolLM2 sizes, bf16)."""
    if weight.dtype == torch.float32 or weight.is_contiguous():
        return torch.matmul(inp, weight.transpose(-1, -2))
    return torch.matmul(weight, inp.transpose(-1, -2)).transpose(-1, -2)


def _rank_mask(rank: torch.Tensor, meta: SegmentMeta, r_hi: int) -> torch.Tensor:
    """[n_slices, span, 1, r_hi] bool: column c is inside the slot's rank."""
    lo, hi = meta.slot_span
    return (torch.arange(r_hi) < rank[:, lo:hi, None]).unsqueeze(2)


def _active_ranks(rank: torch.Tensor, meta: SegmentMeta, r_max: int) -> list[list[int]]:
    ranks = rank.tolist()
    for row in ranks:
        for s in meta.seg_slots_list:
            if not 0 <= row[s] <= r_max:
                raise ValueError(f"rank {row[s]} of slot {s} is outside 0..R_max={r_max}")
    return ranks


def _max_rank(ranks: list[list[int]], meta: SegmentMeta) -> int:
    return max(row[s] for row in ranks for s in meta.seg_slots_list)


def _segment_slices(
    meta: SegmentMeta, ranks: list[list[int]]
) -> Iterator[tuple[int, int, int, int, int]]:
    """(row begin, row end, slot, slice, rank) for each active (segment, slice) pair."""
    starts = meta.seg_starts_list
    for j, s in enumerate(meta.seg_slots_list):
        for i, row in enumerate(ranks):
            if row[s]:
                yield starts[j], starts[j + 1], s, i, row[s]


def slice_offsets(slice_sizes: tuple[int, ...]) -> list[int]:
    offsets = [0]
    for n in slice_sizes:
        offsets.append(offsets[-1] + n)
    return offsets
