"""Expand stage in Triton, adding into y in place:
y[t, off_i:off_i+out_i] += scale[i, s] * (B[s, off_i:off_i+out_i, :rank] @ v[i, t, :rank] + b_up).

Imported lazily, like triton_shrink.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .checks import check_expand_args
from .segment_meta import SegmentMeta
from .tiling import cdiv, expand_tiles
from .triton_shrink import dot_precision


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, out_total], read and written
    v_ptr,  # [n_slices, T, R_max] float32
    b_ptr,  # [S, out_total, R_max]
    rank_ptr,  # [n_slices, S] int32
    scale_ptr,  # [n_slices, S] float32
    bias_ptr,  # [S, out_total], read only when HAS_BIAS
    slice_offsets_ptr,  # [n_slices + 1] int32, column where each slice starts
    sorted_tokens_ptr,  # [T_active] int64
    chunk_slot_ptr,  # [C] int32
    chunk_start_ptr,  # [C] int32
    chunk_len_ptr,  # [C] int32
    R_MAX_STORE,  # R_max: ranks are clamped to it so a bad rank cannot read out of bounds
    stride_yt,
    stride_yo,
    stride_vi,
    stride_vt,
    stride_vr,
    stride_bs,
    stride_bo,
    stride_br,
    stride_ranki,
    stride_bias_s,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (see triton_shrink.dot_precision)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)  # chunk of <= BLOCK_M rows of one slot
    pid_n = tl.program_id(1)  # column tile within the slice
    pid_i = tl.program_id(2)  # slice
    slot = tl.load(chunk_slot_ptr + pid_c).to(tl.int64)
    rank = tl.minimum(tl.load(rank_ptr + pid_i * stride_ranki + slot), R_MAX_STORE)
    col_start = tl.load(slice_offsets_ptr + pid_i)
    width = tl.load(slice_offsets_ptr + pid_i + 1) - col_start
    if (rank <= 0) | (pid_n * BLOCK_N >= width):  # no update here, or past a narrower slice
        return

    row_start = tl.load(chunk_start_ptr + pid_c)
    rows = tl.load(chunk_len_ptr + pid_c)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    tokens = tl.load(sorted_tokens_ptr + row_start + offs_m, mask=mask_m, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    cols = col_start + offs_n
    offs_k = tl.arange(0, BLOCK_K)

    v_ptrs = (  # [M, K]
        v_ptr
        + pid_i.to(tl.int64) * stride_vi
        + tokens[:, None] * stride_vt
        + offs_k[None, :] * stride_vr
    )
    b_ptrs = (  # [K, N]: the B^T tile
        b_ptr
        + slot * stride_bs
        + cols[None, :].to(tl.int64) * stride_bo
        + offs_k[:, None] * stride_br
    )
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, (rank + BLOCK_K - 1) // BLOCK_K):
        k_left = rank - k * BLOCK_K
        v_tile = tl.load(v_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b_tile = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        # fp16/bf16 weights: v is rounded to their dtype so the dot runs on tensor cores.
        acc += tl.dot(v_tile.to(b_tile.dtype), b_tile, input_precision=PRECISION)
        v_ptrs += BLOCK_K * stride_vr
        b_ptrs += BLOCK_K * stride_br

    if HAS_BIAS:
        bias = tl.load(bias_ptr + slot * stride_bias_s + cols, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc *= tl.load(scale_ptr + pid_i * stride_ranki + slot)  # scale is laid out like rank

    y_ptrs = y_ptr + tokens[:, None] * stride_yt + cols[None, :] * stride_yo
    mask = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=mask)


def expand_triton(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [n_slices, T, R_max] float32 (the shrink output)
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32, 0 = no update
    scale: torch.Tensor,  # [n_slices, S] float32
    meta: SegmentMeta,  # built from the [T] token -> slot map
    slice_sizes: tuple[int, ...],  # out_i per slice, summing to out_total
    *,
    b_up: torch.Tensor | None = None,  # [S, out_total], bottleneck bias, scaled with the rest
) -> torch.Tensor:  # y
    """Check the arguments, then launch `_expand_kernel`."""
    check_expand_args(y, v, B, rank, scale, meta, slice_sizes, b_up)
    return launch_expand(y, v, B, rank, scale, meta, slice_sizes, b_up)


def launch_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    B: torch.Tensor,
    rank: torch.Tensor,
    scale: torch.Tensor,
    meta: SegmentMeta,
    slice_sizes: tuple[int, ...],
    b_up: torch.Tensor | None,
) -> torch.Tensor:
    """`expand_triton` for arguments already checked (the dispatcher checks once)."""
    if meta.is_empty:
        return y
    r_max = B.shape[2]
    tiles = expand_tiles(meta.max_seg_len, r_max, max(slice_sizes))
    chunks = meta.chunks(tiles.block_m)
    grid = (chunks.num_chunks, cdiv(max(slice_sizes), tiles.block_n), len(slice_sizes))
    bias = b_up if b_up is not None else y  # never read: HAS_BIAS is False
    _expand_kernel[grid](
        y, v, B, rank, scale, bias, _slice_offsets(slice_sizes, y.device),
        meta.sorted_tokens, chunks.chunk_slot, chunks.chunk_start, chunks.chunk_len,
        r_max,
        y.stride(0), y.stride(1),
        v.stride(0), v.stride(1), v.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        rank.stride(0),
        bias.stride(0),
        HAS_BIAS=b_up is not None,
        PRECISION=dot_precision(B.dtype),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
    )  # fmt: skip
    return y


@functools.cache  # never evicted: a captured CUDA graph reads the tensor where it was
def _slice_offsets(slice_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[n_slices + 1] int32 column offsets; one host->device copy per (layout, device), of
    which a model has a handful (its fused projections' slice widths)."""
    offsets = [0]
    for n in slice_sizes:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)
