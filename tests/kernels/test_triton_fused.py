"""The fused Triton ops (triton_fused.py; interpreted when there is no GPU) against the torch
forms of the reference backend: RMSNorm with and without the residual add, rotary + the K/V
cache write, SiLU-and-multiply. Odd widths on purpose.

fp32 and fp16 round as torch does; the interpreter rounds fp32 -> bf16 by truncation where the
GPU rounds to nearest, so bf16 is held to one bf16 step of the output's magnitude."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels.triton_fused import (
    rms_norm_triton,
    rotary_and_cache_triton,
    silu_and_mul_triton,
)
from peftserve.layers.backend import Backend
from tests.kernels.lowrank_cases import KERNEL_DEVICE, assert_close

REFERENCE = Backend()
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3),
              (torch.bfloat16, 2e-2, 2e-2)]  # fmt: skip


def randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(KERNEL_DEVICE, dtype)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("T, N", [(1, 64), (7, 423), (3, 576)])
def test_rms_norm(dtype, atol, rtol, T, N):
    x, w = randn(T, N, dtype=dtype), randn(N, dtype=dtype, seed=1)
    total, out = rms_norm_triton(x, w, 1e-5)
    assert total is x
    assert_close(out, REFERENCE.rms_norm(x, w, 1e-5), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_add_rms_norm(dtype, atol, rtol):
    x, r, w = (randn(5, 213, dtype=dtype, seed=s) for s in (0, 1, 2))
    total, out = rms_norm_triton(x, w[0], 1e-6, r)
    h, expected = REFERENCE.add_rms_norm(x, r, w[0], 1e-6)
    assert_close(total, h, atol, rtol)
    if dtype != torch.bfloat16:  # the interpreter's bf16 rounding aside, the sum is torch's
        assert torch.equal(total, h)
    assert_close(out, expected, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("heads, kv_heads, D", [(9, 3, 64), (4, 1, 128), (3, 3, 10)])
def test_rotary_and_cache(dtype, atol, rtol, heads, kv_heads, D):
    T, slots = 6, 40
    qkv = randn(T, (heads + 2 * kv_heads) * D, dtype=dtype)
    angles = randn(T, 1, D // 2, dtype=torch.float32, seed=1) * 3
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    slot_mapping = torch.tensor([3, 17, 0, 39, 8, 22], device=KERNEL_DEVICE)
    cache = torch.full((2, kv_heads, slots, D), 7.0, dtype=dtype, device=KERNEL_DEVICE)
    expected_cache = cache.clone()
    q, k, v = REFERENCE.rotary_and_cache(qkv.clone(), cos, sin, expected_cache, slot_mapping,
                                         heads, kv_heads)  # fmt: skip
    out = qkv.clone()
    rotary_and_cache_triton(out, cos, sin, cache, slot_mapping, heads, kv_heads)
    rows = out.view(T, heads + 2 * kv_heads, D)
    assert_close(rows[:, :heads], q, atol, rtol)
    assert_close(rows[:, heads : heads + kv_heads], k, atol, rtol)
    assert torch.equal(rows[:, heads + kv_heads :], v)  # v is only copied
    assert_close(cache, expected_cache, atol, rtol)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot_mapping.cpu()] = False
    assert (cache[:, :, untouched.to(KERNEL_DEVICE)] == 7.0).all()


def test_rotary_skips_padding_slots():
    """slot -1 (a padding row): rotated in place, written nowhere."""
    heads, kv_heads, D = 2, 1, 16
    qkv = randn(2, (heads + 2 * kv_heads) * D, dtype=torch.float32)
    cos, sin = torch.ones(2, 1, D, device=KERNEL_DEVICE), torch.zeros(2, 1, D, device=KERNEL_DEVICE)
    cache = torch.zeros(2, kv_heads, 4, D, device=KERNEL_DEVICE)
    slot_mapping = torch.tensor([-1, 2], device=KERNEL_DEVICE)
    rotary_and_cache_triton(qkv, cos, sin, cache, slot_mapping, heads, kv_heads)
    k1, v1 = qkv[1].view(4, D)[2:]
    assert torch.equal(cache[0, 0, 2], k1) and torch.equal(cache[1, 0, 2], v1)
    assert (cache[:, :, [0, 1, 3]] == 0).all()


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("T, inter", [(1, 96), (5, 1536), (3, 1111)])
def test_silu_and_mul(dtype, atol, rtol, T, inter):
    gate_up = randn(T, 2 * inter, dtype=dtype) * 3
    assert_close(silu_and_mul_triton(gate_up), REFERENCE.silu_and_mul(gate_up), atol, rtol)


def test_refuses_mismatched_layouts():
    x = randn(2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, randn(7, dtype=torch.float32), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_triton(x, randn(8, dtype=torch.float32), 1e-5, x.half())
    with pytest.raises(ValueError, match="gate_up"):
        silu_and_mul_triton(randn(2, 7, dtype=torch.float32))
    with pytest.raises(ValueError, match="qkv"):
        rotary_and_cache_triton(randn(2, 50, dtype=torch.float32), x, x,
                                torch.zeros(2, 1, 4, 8, device=KERNEL_DEVICE),
                                torch.tensor([0, 1], device=KERNEL_DEVICE), 2, 1)  # fmt: skip
