"""Grouped-query attention over a paged KV cache.

Tokens of one step are flattened: first one query token per decoding sequence, then the chunks of
sequences in prefill. The metadata that says where each token's K/V lives and what it may attend to
is built once per step (`AttentionMetadata`) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of this chunk in the step's flattened tokens
    end: int  # one past the last row
    # Flat cache slots of the whole context (earlier tokens + this chunk): [ctx_len]. None when the
    # chunk is the whole context (a fresh prefill), which attends to its own K/V directly.
    context_slots: torch.Tensor | None
    causal_mask: torch.Tensor | None  # [chunk_len, ctx_len] bool, with context_slots


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each token
    num_decodes: int  # rows 0..num_decodes-1 are single decode tokens
    decode_slots: torch.Tensor | None  # [num_decodes, max_ctx] flat slots of each context (padded)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_ctx] bool, False on padding
    prefills: tuple[PrefillChunk, ...]


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    # cache: [2, num_blocks * block_size, kv_heads, head_dim] (a flat view of one layer's blocks)
    # slot_mapping: [T]; k, v: [T, kv_heads, head_dim]
    cache[0].index_copy_(0, slot_mapping, k)
    cache[1].index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's, already in `cache`).
    Returns [T, heads, head_dim]."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        assert meta.decode_slots is not None
        kc = cache[0][meta.decode_slots].transpose(1, 2)  # [nd, kv_heads, max_ctx, head_dim]
        vc = cache[1][meta.decode_slots].transpose(1, 2)
        qd = q[:nd].unsqueeze(2)  # [nd, heads, 1, head_dim]
        o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=meta.decode_mask, scale=scale,
                                           enable_gqa=True)
        out[:nd] = o.squeeze(2)
    for chunk in meta.prefills:
        qc = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
        if chunk.context_slots is None:
            kc = k[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            vc = v[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            kc = cache[0][chunk.context_slots].transpose(0, 1).unsqueeze(0)
            vc = cache[1][chunk.context_slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=chunk.causal_mask,
                                               scale=scale, enable_gqa=True)
        out[chunk.start:chunk.end] = o.squeeze(0).transpose(0, 1)
    return out
