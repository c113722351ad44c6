"""The masked GQA attention against torch's SDPA (the reference), in both of its paths."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from peftserve.layers.attention import decode_attention, masked_gqa_attention


@pytest.mark.parametrize("matmuls", [False, True])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B, Q, L", [(5, 1, 37), (1, 9, 23)])
def test_masked_gqa_attention_matches_sdpa(dtype, atol, B, Q, L, matmuls):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 6, Q, 16, generator=g)
    k, v = torch.randn(B, 2, L, 16, generator=g), torch.randn(B, 2, L, 16, generator=g)
    lens = torch.randint(Q, L + 1, (B,), generator=g)
    pos = torch.arange(L)[None, None, :]  # [1, 1, L]
    qpos = (lens[:, None] - Q + torch.arange(Q)[None, :])[:, :, None]  # [B, Q, 1]
    mask = (pos <= qpos) & (pos < lens[:, None, None])  # causal within each context
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], enable_gqa=True, scale=0.25
    )
    out = masked_gqa_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask[:, None, None], 0.25,
                               matmuls)  # fmt: skip
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("matmuls", [False, True])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_decode_attention_over_head_major_blocks_matches_sdpa(dtype, atol, matmuls):
    # 5 sequences, one query each, 6 query heads sharing 2 KV heads, contexts of up to 37
    # tokens; K/V laid out [kv_heads, B, L, head_dim] as the head-major cache gathers them.
    g = torch.Generator().manual_seed(1)
    B, L = 5, 37
    q = torch.randn(B, 6, 16, generator=g)
    k, v = torch.randn(2, B, L, 16, generator=g), torch.randn(2, B, L, 16, generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lens[:, None]  # [B, L]
    ref = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask[:, None, None],
        enable_gqa=True, scale=0.25,
    )[:, :, 0]
    out = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                           mask[:, None, None, None], 0.25, matmuls)
    assert out.shape == (B, 6, 16) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    # What the cache holds past a sequence's length (zeros or an earlier sequence's finite K/V)
    # changes nothing.
    k2, v2 = k.clone(), v.clone()
    for b in range(B):
        k2[:, b, lens[b]:] = 1e4
        v2[:, b, lens[b]:] = -3e3
    out2 = decode_attention(q.to(dtype), k2.to(dtype), v2.to(dtype),
                            mask[:, None, None, None], 0.25, matmuls)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
