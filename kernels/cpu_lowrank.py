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

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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
    live = _live_segments(ranks, meta)
    if not live:  # no adapter of this step has weights on this module
        return y
    xs = x.index_select(0, meta.sorted_tokens)  # [T_active, in]
    if use_padded_layout(meta, live) if padded is None else padded:
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


@dataclass(frozen=True)
class PackedLora:
    """One slot's LoRA on one fused projection (q,k,v or gate,up), packed for the by-segment
    CPU path: the slices' A rows stacked at their exact ranks, and B block-diagonal over the
    slices with each slice's scale folded in. A segment then costs two matmuls and one add
    whatever the number of slices: small CPU matmuls cost ~25 us each however small they are
    (bench/kernels.py), so the number of calls, not the FLOPs, is what a LoRA costs here.
    Half precision only (the dispatcher's choice): in fp32, the parity dtype, stacking the
    slices changes the order of the sums inside the matmuls, which moved SmolLM2's logits
    1.3e-4 away from PEFT's (the parity bound is 1e-4)."""

    A: torch.Tensor  # [sum of the slices' ranks, in]
    B: torch.Tensor  # [out_total, sum of the slices' ranks]
    B_blocks: torch.Tensor  # [sum of r_i * out_i]: slice i's B^T block [r_i, out_i], in order
    #                         (lora_rows; no zeros off the blocks)
    ranks: tuple[int, ...]  # per slice, in A's row order (0 = no update on the slice)
    offsets: tuple[int, ...]  # per slice's output columns, plus out_total at the end
    macs: int  # multiply-adds per token of the fused form: sum of rank * (in + out) per slice


def pack_lora(
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    slot: int,
    slice_sizes: tuple[int, ...],
) -> PackedLora | None:
    """The slot's weights from the stacked buffers, packed; None when every rank is 0."""
    ranks = [int(r) for r in rank[:, slot].tolist()]
    if not any(ranks):
        return None
    offsets = _offsets(slice_sizes)
    packed_b = torch.zeros(B.shape[1], sum(ranks), dtype=B.dtype, device=B.device)
    col = 0
    for i, r in enumerate(ranks):
        if r:
            rows = slice(offsets[i], offsets[i + 1])
            packed_b[rows, col : col + r] = B[slot, rows, :r].float() * float(scale[i, slot])
            col += r
    packed_a = torch.cat([A[i, slot, :r] for i, r in enumerate(ranks) if r])
    macs = sum(r * (A.shape[3] + offsets[i + 1] - offsets[i]) for i, r in enumerate(ranks))
    blocks = [
        packed_b[offsets[i] : offsets[i + 1], col : col + r].t().reshape(-1)
        for i, (r, col) in enumerate(zip(ranks, itertools.accumulate([0, *ranks]), strict=False))
        if r
    ]
    return PackedLora(
        packed_a.contiguous(),
        packed_b,
        torch.cat(blocks).contiguous(),
        tuple(ranks),
        tuple(offsets),
        macs,
    )


@dataclass(frozen=True)
class FusedSlice:
    cols: tuple[int, int]  # the slice's columns of v (FusedLora.A's rows)
    out: tuple[int, int]  # the slice's output columns of y
    B_t: torch.Tensor  # [cols, out width], scales folded in


@dataclass(frozen=True)
class FusedLora:
    """The packed LoRAs of a set of slots on one fused projection, concatenated along the rank,
    slice by slice: every token of a step multiplies against all of them (one matmul for the
    shrink, one per slice for the expand, so B's zero off-diagonal blocks are never read) and
    a [T, R_tot] mask keeps each token's own slot's columns."""

    slots: tuple[int, ...]  # ascending
    A: torch.Tensor  # [R_tot, in], rows grouped by slice, then by slot
    col_slot: torch.Tensor  # [R_tot] int32, the slot of each column of v
    slices: tuple[FusedSlice, ...]
    layout: tuple[tuple[int, int, int], ...]  # (slice, slot, columns): the masks' cache key


class PackedSlots(Sequence):
    """Every slot's PackedLora on one fused projection (None where the slot has no update
    there), as the engine keeps them, and the FusedLora of the slots the last steps used:
    rebuilt when that set changes or one of its slots is rewritten."""

    def __init__(self, num_slots: int) -> None:
        self._slots: list[PackedLora | None] = [None] * num_slots
        self._fused: FusedLora | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, slot):  # type: ignore[override]
        return self._slots[slot]

    def __setitem__(self, slot: int, packed: PackedLora | None) -> None:
        self._slots[slot] = packed
        if self._fused is not None and slot in self._fused.slots:
            self._fused = None

    def fused(self, slots: tuple[int, ...]) -> FusedLora:
        f = self._fused
        if f is None or f.slots != slots:
            f = self._fused = _fuse(slots, [self._slots[s] for s in slots])
        return f


def _fuse(slots: tuple[int, ...], packed: list[PackedLora | None]) -> FusedLora:
    parts = [(s, p) for s, p in zip(slots, packed, strict=True) if p is not None]
    offsets = parts[0][1].offsets
    a_rows, col_slot, layout, fused_slices = [], [], [], []
    col = 0
    for i in range(len(offsets) - 1):
        out = (offsets[i], offsets[i + 1])
        b_rows, start = [], col
        for s, p in parts:
            r = p.ranks[i]
            if not r:
                continue
            c = sum(p.ranks[:i])  # the slice's rows in the slot's packed A
            a_rows.append(p.A[c : c + r])
            b_rows.append(p.B[out[0] : out[1], c : c + r].t())
            col_slot.append(torch.full((r,), s, dtype=torch.int32))
            layout.append((i, s, r))
            col += r
        if b_rows:
            fused_slices.append(FusedSlice((start, col), out, torch.cat(b_rows).contiguous()))
    return FusedLora(
        slots=slots,
        A=torch.cat(a_rows),
        col_slot=torch.cat(col_slot),
        slices=tuple(fused_slices),
        layout=tuple(layout),
    )


# The fused form multiplies every token against every active slot's columns: T * (R_tot * in +
# sum over slices of R_i * out_i) multiply-adds, ~60 G/s in bf16 on one core here, plus ~40 us
# of fixed cost, against the padded or by-segment layouts' per-slice and per-segment calls.
# Below this much work it wins: 32 decode tokens of 32 q,v LoRAs of ranks 8/16 on q,k,v (23 M)
# take 0.46 ms against 1.39 ms padded (bench/kernels.py, decode_qv, one thread); 4-8 adapters
# on any module won 2-7x in a sweep. Beyond ~60 M it lost (32 all-linear adapters of ranks 8-64
# on q,k,v: 83 M; prefill), and the other forms are kept.
_FUSED_MAX_WORK = 40_000_000


def fused_form(packed: PackedSlots, meta: SegmentMeta) -> FusedLora | None:
    """The step's FusedLora on this projection when the fused form is the cheaper one: two or
    more of the step's slots have weights here and their work stays under _FUSED_MAX_WORK."""
    slots = tuple(s for s in meta.seg_slots_list if packed[s] is not None)
    if len(slots) < 2:
        return None
    if meta.num_active_tokens * sum(packed[s].macs for s in slots) > _FUSED_MAX_WORK:
        return None
    return packed.fused(slots)


def lora_delta_fused_cpu(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    packed: PackedSlots,
    meta: SegmentMeta,
) -> bool:
    """y[t] += B_s @ (A_s @ x[t]) for each token's slot s through the step's FusedLora, when
    that is the cheaper form (see _FUSED_MAX_WORK); False, with y untouched, when it is not.
    Rows of tokens without a slot are never read."""
    f = fused_form(packed, meta)
    if f is None:
        return False
    mask = meta.column_mask(f.layout, f.col_slot, x.dtype)
    if meta.all_tokens_active:
        v = F.linear(x, f.A)  # [T, R_tot]
        v.mul_(mask)
        for sl in f.slices:
            y[:, sl.out[0] : sl.out[1]].addmm_(v[:, sl.cols[0] : sl.cols[1]], sl.B_t)
    else:
        v = F.linear(x.index_select(0, meta.sorted_tokens), f.A)  # [T_active, R_tot]
        v.mul_(mask)
        d = torch.zeros(v.shape[0], y.shape[1], dtype=y.dtype)
        for sl in f.slices:
            d[:, sl.out[0] : sl.out[1]].addmm_(v[:, sl.cols[0] : sl.cols[1]], sl.B_t)
        y.index_add_(0, meta.sorted_tokens, d)
    return True


def lora_delta_packed_cpu(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    packed: Sequence[PackedLora | None],  # by slot; None = the slot has no update here
    meta: SegmentMeta,
) -> torch.Tensor:
    """y[t] += B_s @ (A_s @ x[t]) for each token's slot s, one segment at a time (the packed
    form of lowrank_delta_cpu's by-segment layout, LoRA only). Rows are read and written in
    place when the step's tokens are already grouped by slot (`meta.in_order`)."""
    if meta.is_empty:
        return y
    starts = meta.seg_starts_list
    xs = x if meta.in_order else x.index_select(0, meta.sorted_tokens)
    for j, s in enumerate(meta.seg_slots_list):
        p = packed[s]
        if p is None:
            continue
        a, b = starts[j], starts[j + 1]
        d = F.linear(F.linear(xs[a:b], p.A), p.B)
        if meta.in_order:
            y[a:b].add_(d)
        else:
            y.index_add_(0, meta.sorted_tokens[a:b], d)
    return y


@dataclass(frozen=True)
class PackedBottleneck:
    """One slot's bottleneck adapter at one placement, at its exact rank, for the by-segment
    CPU path in half precision: y += scale * (B act(A y + b_down) + b_up)."""

    A: torch.Tensor  # [r, hidden]
    b_down: torch.Tensor  # [r]
    B: torch.Tensor  # [hidden, r]
    B_t: torch.Tensor  # [r, hidden] (bottleneck_rows)
    b_up: torch.Tensor  # [hidden]
    scale: float
    act: str


def pack_bottleneck(
    A: torch.Tensor,  # [1, S, R_max, hidden]
    b_down: torch.Tensor,  # [S, R_max]
    B: torch.Tensor,  # [S, hidden, R_max]
    b_up: torch.Tensor,  # [S, hidden]
    scale: float,
    slot: int,
    rank: int,
    act: str,
) -> PackedBottleneck:
    """The slot's rows of the stacked bottleneck buffers at its exact rank, contiguous."""
    return PackedBottleneck(
        A=A[0, slot, :rank].contiguous(),
        b_down=b_down[slot, :rank].contiguous(),
        B=B[slot, :, :rank].contiguous(),
        B_t=B[slot, :, :rank].t().contiguous(),
        b_up=b_up[slot].contiguous(),
        scale=float(scale),
        act=act,
    )


def bottleneck_delta_packed_cpu(
    y: torch.Tensor,  # [T, hidden], the sub-layer output, updated in place
    packed: Sequence[PackedBottleneck | None],  # by slot; None = no adapter at this placement
    meta: SegmentMeta,
) -> torch.Tensor:
    """y[t] += scale_s * (B_s act(A_s y[t] + b_down_s) + b_up_s) for each token's slot s, one
    segment at a time; every segment reads y as it was before any update."""
    if meta.is_empty:
        return y
    starts = meta.seg_starts_list
    xs = y.clone() if meta.in_order else y.index_select(0, meta.sorted_tokens)
    for j, s in enumerate(meta.seg_slots_list):
        p = packed[s]
        if p is None:
            continue
        a, b = starts[j], starts[j + 1]
        h = activation_fn(p.act)(F.linear(xs[a:b], p.A, p.b_down))
        d = F.linear(h, p.B, p.b_up).mul_(p.scale)
        if meta.in_order:
            y[a:b].add_(d)
        else:
            y.index_add_(0, meta.sorted_tokens[a:b], d)
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
    offsets = _offsets(slice_sizes)
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
    offsets = _offsets(slice_sizes)
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


def _offsets(slice_sizes: tuple[int, ...]) -> list[int]:
    offsets = [0]
    for n in slice_sizes:
        offsets.append(offsets[-1] + n)
    return offsets
