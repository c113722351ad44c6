"""A step's adapter deltas on the CPU in half precision, token by token in C++
(csrc/lowrank_rows_cpu.cpp, built by cpu_ext): each token multiplies against its own slot's
packed weights at their exact rank (cpu_packed.PackedLora, PackedBottleneck), sums in fp32 and
rounds once into y. The dispatcher and the adapter hook take these where the C++ kernels are
built; cpu_lowrank's torch forms serve without them. Arguments are checked by the C++ op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .activation import activation_code
from .cpu_packed import PackedBottleneck, PackedLora
from .segment_meta import SegmentMeta


def lora_delta_rows_cpu(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    packed: Sequence[PackedLora | None],  # by slot; None = the slot has no update here
    meta: SegmentMeta,
) -> torch.Tensor:
    """y[t] += B_s @ (A_s @ x[t]) for each token's slot s, token by token in the C++ op
    (csrc/lowrank_rows_cpu.cpp; half precision, cpu_ext loaded): each token reads its own slot's
    weights at their exact rank, sums in fp32, and y is rounded once."""
    if meta.is_empty:
        return y
    bounds, A, B_blocks, ranks = lora_rows_args(packed, meta)
    if A:
        offsets = next(p for p in packed if p is not None).offsets
        rows = None if meta.in_order else meta.sorted_tokens
        torch.ops.peftserve_cpu.lora_rows(y, x, rows, bounds, A, B_blocks, ranks, list(offsets))
    return y


def _segments_with_weights(
    packed: Sequence[PackedLora | PackedBottleneck | None], meta: SegmentMeta
) -> tuple[list[int], list]:
    """The step's segments with weights here: their (row0, row1) pairs in sorted order, flat,
    and their slots' packed weights."""
    starts = meta.seg_starts_list
    bounds: list[int] = []
    live: list = []
    for j, s in enumerate(meta.seg_slots_list):
        if packed[s] is not None:
            bounds += [starts[j], starts[j + 1]]
            live.append(packed[s])
    return bounds, live


def lora_rows_args(
    packed: Sequence[PackedLora | None], meta: SegmentMeta
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor], list[int]]:
    """lora_rows' per-segment arguments for the step's segments with weights here: (row0, row1)
    pairs in sorted order, A and B_blocks, and the ranks per slice."""
    bounds, live = _segments_with_weights(packed, meta)
    ranks = [r for p in live for r in p.ranks]
    return bounds, [p.A for p in live], [p.B_blocks for p in live], ranks


def bottleneck_delta_rows_cpu(
    y: torch.Tensor,  # [T, hidden], the sub-layer output, updated in place
    packed: Sequence[PackedBottleneck | None],  # by slot; None = no adapter at this placement
    meta: SegmentMeta,
) -> torch.Tensor:
    """y[t] += scale_s * (B_s act(A_s y[t] + b_down_s) + b_up_s) for each token's slot s, token
    by token in the C++ op (csrc/lowrank_rows_cpu.cpp; half precision, cpu_ext loaded), each
    token reading its own row of y before its update."""
    if meta.is_empty:
        return y
    bounds, tensors, scales = bottleneck_rows_args(packed, meta)
    if scales:
        act = next(p for p in packed if p is not None).act
        rows = None if meta.in_order else meta.sorted_tokens
        torch.ops.peftserve_cpu.bottleneck_rows(
            y, rows, bounds, *tensors, scales, activation_code(act)
        )
    return y


def bottleneck_rows_args(
    packed: Sequence[PackedBottleneck | None], meta: SegmentMeta
) -> tuple[list[int], tuple[list[torch.Tensor], ...], list[float]]:
    """bottleneck_rows' per-segment arguments: (row0, row1) pairs, (A, b_down, B_t, b_up) lists
    and the scales, for the step's segments with an adapter here."""
    bounds, live = _segments_with_weights(packed, meta)
    tensors = tuple([getattr(p, f) for p in live] for f in ("A", "b_down", "B_t", "b_up"))
    return bounds, tensors, [p.scale for p in live]
