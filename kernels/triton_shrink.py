"""Shrink stage in Triton: v[i, t, :rank] = act(A[i, s, :rank] @ x[t] + b_down[s, :rank]).

Imported lazily (first CUDA dispatch, or by the tests after they set TRITON_INTERPRET): a
`@triton.jit` function defined while the interpreter is off cannot run on a machine without a
GPU driver. The kernels use only `tl` builtins, none of the `@triton.jit` helpers of
`triton.language.standard` (`tl.zeros`, `tl.cdiv`, `tl.sigmoid`): those are fixed as compiled or
interpreted when `triton.language` is first imported, which in a test session may happen before
TRITON_INTERPRET is set (importing transformers' models imports triton through torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import activation_code
from .checks import check_shrink_args
from .segment_meta import SegmentMeta
from .tiling import cdiv, shrink_tiles


@triton.jit
def activate(h, ACT: tl.constexpr):
    """A bottleneck's activation of its down projection (activation.py's codes): 0 none,
    1 relu, 2 silu, 3 gelu (erf)."""
    if ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = h / (1.0 + tl.exp(-h))
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return h


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in]
    a_ptr,  # [n_slices, S, R_max, in]
    v_ptr,  # [n_slices, T, R_max] float32
    rank_ptr,  # [n_slices, S] int32
    bias_ptr,  # [S, R_max], read only when HAS_BIAS
    sorted_tokens_ptr,  # [T_active] int64
    chunk_slot_ptr,  # [C] int32
    chunk_start_ptr,  # [C] int32
    chunk_len_ptr,  # [C] int32
    K,  # in
    R_MAX_STORE,  # R_max: ranks are clamped to it so a bad rank cannot read out of bounds
    stride_xt,
    stride_xk,
    stride_ai,
    stride_as,
    stride_ar,
    stride_ak,
    stride_vi,
    stride_vt,
    stride_vr,
    stride_ranki,
    stride_bias_s,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 silu, 3 gelu (activation.py)
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (see dot_precision)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)  # chunk of <= BLOCK_M rows of one slot
    pid_i = tl.program_id(1)  # slice
    pid_n = tl.program_id(2)  # rank tile
    slot = tl.load(chunk_slot_ptr + pid_c).to(tl.int64)
    rank = tl.minimum(tl.load(rank_ptr + pid_i * stride_ranki + slot), R_MAX_STORE)
    if pid_n * BLOCK_N >= rank:  # also rank <= 0: this slot has no update on this slice
        return

    row_start = tl.load(chunk_start_ptr + pid_c)
    rows = tl.load(chunk_len_ptr + pid_c)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    tokens = tl.load(sorted_tokens_ptr + row_start + offs_m, mask=mask_m, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [M, K]
    a_ptrs = (  # [K, N]: the A^T tile
        a_ptr
        + pid_i.to(tl.int64) * stride_ai
        + slot * stride_as
        + offs_n[None, :] * stride_ar
        + offs_k[:, None] * stride_ak
    )
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_left = K - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        a_tile = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc += tl.dot(x_tile, a_tile, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    if HAS_BIAS:
        bias = tl.load(bias_ptr + slot * stride_bias_s + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = activate(acc, ACT)

    v_ptrs = v_ptr + pid_i.to(tl.int64) * stride_vi + tokens[:, None] * stride_vt
    tl.store(v_ptrs + offs_n[None, :] * stride_vr, acc, mask=mask_m[:, None] & mask_n[None, :])


def shrink_triton(
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    rank: torch.Tensor,  # [n_slices, S] int32, 0 = no update
    meta: SegmentMeta,  # built from the [T] token -> slot map
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max], bottleneck bias before `act`
    act: str | None = None,  # "relu" | "silu" | "gelu" | None
) -> torch.Tensor:  # v: [n_slices, T, R_max] float32, zero outside each token's rank
    """Check the arguments, then launch `_shrink_kernel`."""
    check_shrink_args(x, A, rank, meta, b_down, act)
    return launch_shrink(x, A, rank, meta, b_down, act)


def launch_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    rank: torch.Tensor,
    meta: SegmentMeta,
    b_down: torch.Tensor | None,
    act: str | None,
) -> torch.Tensor:
    """`shrink_triton` for arguments already checked (the dispatcher checks once)."""
    n_slices, _, r_max, d_in = A.shape
    v = torch.zeros(n_slices, x.shape[0], r_max, dtype=torch.float32, device=x.device)
    if meta.is_empty:
        return v
    tiles = shrink_tiles(meta.max_seg_len, r_max, d_in)
    chunks = meta.chunks(tiles.block_m)
    grid = (chunks.num_chunks, n_slices, cdiv(r_max, tiles.block_n))
    bias = b_down if b_down is not None else v  # never read: HAS_BIAS is False
    _shrink_kernel[grid](
        x, A, v, rank, bias,
        meta.sorted_tokens, chunks.chunk_slot, chunks.chunk_start, chunks.chunk_len,
        d_in, r_max,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2), A.stride(3),
        v.stride(0), v.stride(1), v.stride(2),
        rank.stride(0),
        bias.stride(0),
        HAS_BIAS=b_down is not None,
        ACT=activation_code(act),
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
    )  # fmt: skip
    return v


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own TF32 switch (off by default) so that results match torch
    matmuls; fp16/bf16 dots run on tensor cores whatever this says."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
