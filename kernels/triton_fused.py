"""Small fused ops of a decoder layer in Triton, each one launch instead of several torch ops:
(residual add +) RMSNorm, rotary on q/k + the K/V cache write, SiLU-and-multiply.

Each rounds where the torch forms of the reference backend (server/layers/backend.Backend)
round, so in half precision the results match them up to the order of a sum: transformers'
Llama spells RMSNorm as `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`, rotary as
`x * cos + rotate_half(x) * sin` (three roundings) and SwiGLU as `silu(gate) * up` (two).

Imported lazily, like triton_shrink.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import cdiv, pow2_at_least
from .triton_combine import add as _add


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    residual_ptr,  # [T, N], read only when HAS_RESIDUAL
    sum_ptr,  # [T, N] x + residual, written only when HAS_RESIDUAL
    out_ptr,  # [T, N]
    w_ptr,  # [N]
    N,
    eps,
    stride_x,
    stride_r,
    stride_s,
    stride_o,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # N padded to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # rounded as torch's `x + r`
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.reduce(xf * xf, 0, _add) / N + eps)
    normed = (xf * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(dtype), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]: normalise x + residual instead
) -> tuple[torch.Tensor, torch.Tensor]:  # (x + residual, or x; the normalised rows) [T, N]
    """out = weight * rms_norm((x + residual).float()).to(dtype), and the sum, in one launch."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"x [T, N] and weight [N] of x's dtype, got {tuple(x.shape)} "
                         f"{x.dtype}, {tuple(weight.shape)} {weight.dtype}")  # fmt: skip
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must be {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")  # fmt: skip
    x, weight = _rows_contiguous(x), weight.contiguous()
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    res = x if residual is None else _rows_contiguous(residual)
    if x.shape[0]:
        block = pow2_at_least(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x, res, total, out, weight, x.shape[1], eps,
            x.stride(0), res.stride(0), total.stride(0), out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return total, out


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr,  # [T, (heads + 2 kv_heads) * D], q and k rotated in place
    cos_ptr,  # [T, D]
    sin_ptr,  # [T, D]
    cache_ptr,  # [2, kv_heads, slots, D]
    slot_mapping_ptr,  # [T] int, < 0: write nothing (a padding token)
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_ckv,
    stride_ch,
    stride_cs,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # HEAD_DIM // 2 padded to a power of two
):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # 0..heads-1: q; then kv_heads of k; then kv_heads of v
    half = HEAD_DIM // 2
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < half
    base = qkv_ptr + t * stride_qkv + head * HEAD_DIM
    x1 = tl.load(base + offs, mask=mask, other=0.0)
    x2 = tl.load(base + half + offs, mask=mask, other=0.0)
    dtype = x1.dtype
    if head < HEADS + KV_HEADS:
        c1 = tl.load(cos_ptr + t * stride_cos + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_cos + half + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_sin + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_sin + half + offs, mask=mask, other=0.0).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
        x1 = ((f1 * c1).to(dtype).to(tl.float32) + (-f2 * s1).to(dtype).to(tl.float32)).to(dtype)
        x2 = ((f2 * c2).to(dtype).to(tl.float32) + (f1 * s2).to(dtype).to(tl.float32)).to(dtype)
        tl.store(base + offs, x1, mask=mask)
        tl.store(base + half + offs, x2, mask=mask)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if (head >= HEADS) & (slot >= 0):
        kv = (head - HEADS) // KV_HEADS  # 0 = K, 1 = V
        kv_head = ((head - HEADS) % KV_HEADS).to(tl.int64)
        dst = cache_ptr + kv.to(tl.int64) * stride_ckv + kv_head * stride_ch + slot * stride_cs
        tl.store(dst + offs, x1, mask=mask)
        tl.store(dst + half + offs, x2, mask=mask)


def rotary_and_cache_triton(
    qkv: torch.Tensor,  # [T, (heads + 2 kv_heads) * D], contiguous rows; q, k rotated in place
    cos: torch.Tensor,  # [T, D] (or [T, 1, D])
    sin: torch.Tensor,  # [T, D] (or [T, 1, D])
    cache: torch.Tensor,  # [2, kv_heads, slots, D], one layer's
    slot_mapping: torch.Tensor,  # [T] int, the flat cache slot of each token's K/V
    heads: int,
    kv_heads: int,
) -> None:
    """Rotary on q and k (transformers' rotate_half form) and k, v written to their slots."""
    T, D = qkv.shape[0], cache.shape[-1]
    cos, sin = cos.reshape(T, D), sin.reshape(T, D)
    if qkv.shape[1] != (heads + 2 * kv_heads) * D or qkv.stride(1) != 1 or D % 2:
        raise ValueError(f"qkv must be [T, {(heads + 2 * kv_heads) * D}] with unit column "
                         f"stride, got {tuple(qkv.shape)} {qkv.stride()}")  # fmt: skip
    if cache.shape[:2] != (2, kv_heads) or cache.stride(3) != 1 or cache.dtype != qkv.dtype:
        raise ValueError(f"cache must be [2, {kv_heads}, slots, {D}] of {qkv.dtype}, got "
                         f"{tuple(cache.shape)} {cache.dtype}")  # fmt: skip
    if cos.stride(1) != 1 or sin.stride(1) != 1 or slot_mapping.shape != (T,):
        raise ValueError("cos, sin [T, D] contiguous in D and slot_mapping [T]")
    if T == 0:
        return
    _rotary_cache_kernel[(T, heads + 2 * kv_heads)](
        qkv, cos, sin, cache, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        cache.stride(0), cache.stride(1), cache.stride(2),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEAD_DIM=D,
        BLOCK_HALF=pow2_at_least(D // 2),
        num_warps=1,
    )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [T, 2 * I]
    out_ptr,  # [T, I]
    inter,  # I
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gate_up_ptr + t * stride_in + offs, mask=mask, other=0.0)
    u = tl.load(gate_up_ptr + t * stride_in + inter + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # rounded as torch's silu(gate)
    tl.store(out_ptr + t * stride_out + offs, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype),
             mask=mask)  # fmt: skip


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] -> silu(gate) * up [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * I], got {tuple(gate_up.shape)}")
    gate_up = _rows_contiguous(gate_up)
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(T, inter)
    if T:
        block = min(1024, pow2_at_least(inter))
        _silu_and_mul_kernel[(T, cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
