"""Grouped-query attention over a paged KV cache.

Tokens of one step are flattened: first one query token per decoding sequence, then the chunks of
sequences in prefill. The metadata that says where each token's K/V lives and what it may attend to
is built once per step (`AttentionMetadata`) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from peftserve.layers.backend import Backend



@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of this chunk in the step's flattened tokens
    end: int  # one past the last row
    # Flat cache slots of the whole context (earlier tokens + this chunk): [ctx_len]. None when the
    # chunk is the whole context (a fresh prefill), which attends to its own K/V directly.
    context_slots: torch.Tensor | None
    causal_mask: torch.Tensor | None  # [1, 1, 1, chunk_len, ctx_len] bool, with context_slots


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each token
    num_decodes: int  # rows 0..num_decodes-1 are single decode tokens
    block_size: int
    decode_blocks: torch.Tensor | None  # [num_decodes, max_blocks] block tables (padded with 0)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, 1, max_blocks * block_size] bool
    decode_lens: torch.Tensor | None  # [num_decodes] int64 context length (this token included)
    prefills: tuple[PrefillChunk, ...]


def write_kv(
    cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    # cache: [2, kv_heads, num_blocks * block_size, head_dim] (one layer's blocks, head-major, so
    # that a gather of whole blocks is already the [kv_heads, seqs, ctx, head_dim] attention reads)
    # slot_mapping: [T]; k, v: [T, kv_heads, head_dim]
    cache[0].index_copy_(1, slot_mapping, k.transpose(0, 1))
    cache[1].index_copy_(1, slot_mapping, v.transpose(0, 1))


def masked_gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    matmuls: bool,
) -> torch.Tensor:  # fmt: skip
    """q: [B, heads, Q, head_dim]; k, v: [B, kv_heads, L, head_dim]; mask: bool
    [B, 1, 1, Q, L], True = attend. Returns [B, heads, Q, head_dim]. `matmuls`: two matmuls
    instead of SDPA (Backend.matmul_attention says where that is faster)."""
    if not matmuls:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, 0], scale=scale, enable_gqa=True
        )
    # With a mask, the CPU SDPA kernels are up to 10x slower in bf16/fp16 at decode shapes than
    # these two matmuls; scores are softmaxed in fp32 as transformers' eager path does.
    B, H, Q, D = q.shape
    kvh, L = k.shape[1], k.shape[2]
    group = H // kvh
    qg = q.reshape(B, kvh, group * Q, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(B, kvh, group, Q, L).float() * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs.view(B, kvh, group * Q, L), v).view(B, H, Q, D)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    matmuls: bool,
) -> torch.Tensor:  # fmt: skip
    """One query token per sequence. q: [B, heads, head_dim]; k, v: [kv_heads, B, L, head_dim]
    as gathered from the head-major cache (contiguous: the matmuls read it in place); mask:
    bool [B, 1, 1, 1, L], True = attend. Returns [B, heads, head_dim]. `matmuls` as in
    masked_gqa_attention."""
    B, H, D = q.shape
    kvh, L = k.shape[0], k.shape[2]
    group = H // kvh
    if not matmuls:
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask[:, 0],
            scale=scale,
            enable_gqa=True,
        )
        return o.squeeze(2)
    # The group's query heads share their KV head: [kv_heads, B, group, head_dim] x [.., L, ..]
    qg = q.view(B, kvh, group, D).transpose(0, 1)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [kv_heads, B, group, L]
    probs = scores.masked_fill(~mask.view(B, 1, L), float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(B, H, D)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    backend: Backend,
) -> torch.Tensor:
    """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's, already in `cache`).
    Returns [T, heads, head_dim]. Decode rows go to the backend's decode attention."""
    nd = meta.num_decodes
    if nd and not meta.prefills:  # a decode-only step: the backend's output is the step's
        return backend.decode_attention(q, cache, meta, scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = backend.decode_attention(q[:nd], cache, meta, scale)
    for chunk in meta.prefills:
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
        if chunk.context_slots is None:
            kc = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            vc = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            assert chunk.causal_mask is not None
            kc = cache[0][:, chunk.context_slots].unsqueeze(0)
            vc = cache[1][:, chunk.context_slots].unsqueeze(0)
            o = masked_gqa_attention(
                qc, kc, vc, chunk.causal_mask, scale, backend.matmul_attention(q.dtype)
            )
        out[chunk.start : chunk.end] = o.squeeze(0).transpose(0, 1)
    return out
