"""The adapters' weights packed per slot for the CPU in half precision, and the torch form that
reads them where the C++ kernels are not built (the CPU backend without a compiler): by segment,
two matmuls per segment whatever the number of slices. The C++ op (cpu_rows.py) reads the same
packed weights.
"""

from __future__ import annotations

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


def pack_lora(
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    slot: int,
    slice_sizes: tuple[int, ...],
) -> PackedLora | None:
    """The slot's weights from the stacked buffers, packed; None when every rank is 0."""
    ranks = tuple(int(r) for r in rank[:, slot].tolist())
    packed = pack_lora_layers([A], [B], ranks, [scale[:, slot].tolist()], slot, slice_sizes)
    return None if packed is None else packed[0]


def pack_lora_layers(
    As: Sequence[torch.Tensor],  # per layer: [n_slices, S, R_max, in]
    Bs: Sequence[torch.Tensor],  # per layer: [S, out_total, R_max]
    ranks: tuple[int, ...],  # per slice, the same in every layer
    scales: Sequence[Sequence[float]],  # [layers][n_slices], float32 values
    slot: int,
    slice_sizes: tuple[int, ...],
) -> list[PackedLora] | None:
    """pack_lora of one slot in several layers of one projection whose slices have the same
    ranks, over the layers stacked: a slot write packs ~30 layers a projection, and per layer
    the ~25 small ops cost more than their bytes. None when every rank is 0."""
    if not any(ranks):
        return None
    offsets = slice_offsets(slice_sizes)
    L, r_max = len(As), max(ranks)
    a = torch.stack([A[:, slot, :r_max] for A in As])  # [L, n_slices, r_max, in]
    b = torch.stack([B[slot, :, :r_max] for B in Bs])  # [L, out_total, r_max]
    scale = torch.tensor(scales, dtype=torch.float32)  # [L, n_slices]
    live = [i for i, r in enumerate(ranks) if r]
    packed_a = torch.cat([a[:, i, : ranks[i]] for i in live], dim=1)  # [L, sum r, in]
    packed_b = b.new_zeros(L, b.shape[1], sum(ranks))
    blocks, col = [], 0
    for i in live:
        r, rows = ranks[i], slice(offsets[i], offsets[i + 1])
        # the slice's scale folded in, in fp32, rounded once
        block = b[:, rows, :r].float().mul_(scale[:, i, None, None]).to(b.dtype)  # [L, out_i, r]
        packed_b[:, rows, col : col + r] = block
        blocks.append(block.transpose(1, 2).reshape(L, -1))
        col += r
    b_blocks = torch.cat(blocks, dim=1)
    return [PackedLora(packed_a[j], packed_b[j], b_blocks[j], ranks, tuple(offsets))
            for j in range(L)]  # fmt: skip


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
