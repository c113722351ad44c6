"""Public ops: check the arguments once, then run on the tensors' device.

CUDA tensors go to the Triton kernels, imported on first use (see triton_shrink.py). On the CPU a
LoRA delta takes one of three forms, chosen here and nowhere else:

1. Half precision, C++ kernels built (`native`; the CPU backend, server/layers/backend.py,
   knows): `lora_rows` (cpu_rows.py), every token against its slot's packed weights at their
   exact rank, summed in fp32, rounded once; a token's result does not depend on its batch.
   The fastest form at every batch bench/multi_adapter.py runs (bench/README.md, multi-adapter).
2. Half precision without a compiler: the same packed weights, two torch matmuls per segment of
   tokens sharing a slot (cpu_packed.lora_delta_packed_cpu).
3. fp32, the parity dtype, and backends that keep no packed weights: the stacked slot buffers
   (cpu_lowrank.lowrank_delta_cpu), as a batched matmul over slots padded to the step's largest
   rank, or segment by segment where padding would multiply the rows (a long prefill beside
   short segments: `use_padded_layout`). 32 one-token segments of q,v LoRAs: padded ~4x faster
   than segment by segment.
Bottleneck adapters use forms 1 and 3 the same way (`bottleneck_rows` in half precision).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_expand_args, check_lowrank_args, check_shrink_args
from .cpu_lowrank import expand_cpu, lowrank_delta_cpu, shrink_cpu
from .cpu_packed import PackedLora, lora_delta_packed_cpu
from .cpu_rows import lora_delta_rows_cpu
from .segment_meta import SegmentMeta


def lora_shrink(
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    rank: torch.Tensor,  # [n_slices, S] int32, 0 = no update on that slice
    meta: SegmentMeta,  # this step's token -> slot grouping
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max], bottleneck bias before `act`
    act: str | None = None,  # "relu" | "silu" | "gelu" | None
) -> torch.Tensor:  # v: [n_slices, T, R_max] float32, zero outside each token's rank
    """v[i, t, :r] = act(A[i, s, :r] @ x[t] + b_down[s, :r]), s = slot of t, r = rank[i, s].

    Tokens with slot -1 and slices with rank 0 leave zeros. See reference.shrink_reference.
    """
    check_shrink_args(x, A, rank, meta, b_down, act)
    if _on_cuda(x):
        from .triton_shrink import launch_shrink

        return launch_shrink(x, A, rank, meta, b_down, act)
    return shrink_cpu(x, A, rank, meta, b_down, act)


def lora_expand(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [n_slices, T, R_max] float32 (lora_shrink's output)
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],  # out_i per slice, summing to out_total
    *,
    b_up: torch.Tensor | None = None,  # [S, out_total], bottleneck bias, scaled with the rest
) -> torch.Tensor:  # y
    """y[t, off_i:off_i+out_i] += scale[i, s] * (B[s, off_i:off_i+out_i, :r] @ v[i, t, :r] + b_up).

    In place; rows with slot -1 and slices with rank 0 are untouched. See
    reference.expand_reference.
    """
    check_expand_args(y, v, B, rank, scale, meta, slice_sizes, b_up)
    if _on_cuda(y):
        from .triton_expand import launch_expand

        return launch_expand(y, v, B, rank, scale, meta, slice_sizes, b_up)
    return expand_cpu(y, v, B, rank, scale, meta, slice_sizes, b_up)


def add_lowrank_delta(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],  # out_i per slice, summing to out_total
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max]
    b_up: torch.Tensor | None = None,  # [S, out_total]
    act: str | None = None,  # "relu" | "silu" | "gelu" | None
    packed: Sequence[PackedLora | None] | None = None,  # CPU, LoRA: the slots' packed weights
    native: bool = False,  # with `packed`: the C++ CPU op (cpu_ext loaded) instead of torch's
) -> torch.Tensor:  # y
    """Shrink then expand: LoRA (no biases, no act) or a bottleneck adapter; y updated in place.

    A base-only step (no token has a slot) returns y at once, before any check. On CPU the
    intermediate is never materialised as [n_slices, T, R_max]. See
    reference.lowrank_delta_reference.

    `packed` (cpu_packed.pack_lora of each slot, kept in step with A/B/rank/scale by the
    caller) selects the CPU's half-precision forms (see the module's docstring): with `native`,
    one call of lora_rows; without, two matmuls per segment. fp32 reads the stacked buffers.
    """
    if meta.is_empty:
        return y
    if packed is not None and not x.is_cuda and x.dtype != torch.float32:
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.dtype != y.dtype:
            raise ValueError(
                f"x [T, in] and y [T, out] of one dtype, got {x.shape} {x.dtype}, "
                f"{y.shape} {y.dtype}"
            )
        if native:  # each token at its slot's exact rank, one C++ call
            return lora_delta_rows_cpu(y, x, packed, meta)
        return lora_delta_packed_cpu(y, x, packed, meta)
    check_lowrank_args(y, x, A, B, rank, scale, meta, slice_sizes, b_down, b_up, act)
    if _on_cuda(x):
        from .triton_expand import launch_expand
        from .triton_shrink import launch_shrink

        v = launch_shrink(x, A, rank, meta, b_down, act)
        return launch_expand(y, v, B, rank, scale, meta, slice_sizes, b_up)
    return lowrank_delta_cpu(y, x, A, B, rank, scale, meta, slice_sizes, b_down, b_up, act)


def _on_cuda(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return True
    if not t.is_cpu:
        raise ValueError(f"tensors must be on a CUDA device or the CPU, got {t.device}")
    return False
