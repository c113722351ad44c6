"""The adapters' weights packed per slot for the CPU in half precision, and the torch forms that
read them where the C++ kernels are not built (the CPU backend without a compiler): by segment
(two matmuls per segment, whatever the number of slices) and fused (every active slot's columns
in two matmuls, where that is cheaper). The C++ op (cpu_rows.py) reads the same packed weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .activation import activation_fn
from .cpu_lowrank import slice_offsets
from .segment_meta import SegmentMeta


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
    offsets = slice_offsets(slice_sizes)
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
