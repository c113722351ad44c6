"""The masked GQA attention against torch's SDPA (the reference), in both of its paths."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from peftserve.layers.attention import masked_gqa_attention


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B, Q, L", [(5, 1, 37), (1, 9, 23)])
def test_masked_gqa_attention_matches_sdpa(dtype, atol, B, Q, L):
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
    out = masked_gqa_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask[:, None, None], 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
