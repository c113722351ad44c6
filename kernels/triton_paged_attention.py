"""Paged decode attention in Triton: one query token per sequence, K/V read where they lie.

    out[b, h] = softmax(scale * K_b q[b, h]) V_b,  K_b, V_b = the first ctx_len[b] positions of
                sequence b's blocks (block_tables[b]) in the cache, KV head h // (heads / kv_heads)

One program holds all the query heads of one KV head (GQA: each K/V tile is read once for the
whole group) over one split of the context; with more than one split, a second kernel merges
the splits' partial softmax states. Online softmax, fp32 accumulation. The split length is
fixed (PARTITION): a sequence's result is the same bits in any batch. The number of splits
depends only on the block tables' width (a host shape), never on the lengths' values, so the
launch reads no device data on the host (CUDA-graph safe). A split past its sequence's
context returns at once, writing nothing, and the merge reads only the sequence's own splits:
a wide table (a CUDA graph's, as wide as the longest context it serves) adds no traffic.

Imported lazily, like triton_shrink.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import cdiv, pow2_at_least
from .triton_combine import add as _add
from .triton_combine import maximum as _maximum
from .triton_shrink import dot_precision

# Context positions per split, the same for every batch: a sequence's splits, and so the order
# of its sums, never depend on the rest of its batch (an SM-filling choice from the batch size
# made a request's fp32 attention differ in its last bits between batch sizes). A 2K context
# is 8 splits per KV head at batch 1; 16K fills one merge chunk.
PARTITION = 256
MERGE_CHUNK = 64  # splits merged per step of the merge kernel's loop


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, heads, D]
    k_ptr,  # [kv_heads, slots, D] one layer's keys, slot = block * block_size + offset
    v_ptr,  # [kv_heads, slots, D] its values, strided as the keys
    block_table_ptr,  # [B, max_blocks] int
    ctx_len_ptr,  # [B] int, this token included
    out_ptr,  # [B, heads, D], written when ONE_PASS
    part_acc_ptr,  # [B, heads, n_splits, D] float32, unnormalised partial outputs
    part_max_ptr,  # [B, heads, n_splits] float32, running max of the split's scores
    part_sum_ptr,  # [B, heads, n_splits] float32, sum of exp(score - max)
    scale,
    block_size,
    tokens_per_split,
    n_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot's minimum)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # context positions per tile
    ONE_PASS: tl.constexpr,  # one split: normalise and write `out` here
    PRECISION: tl.constexpr,  # "tf32" for half precision (exact), fp32: dot_precision
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx_len = tl.load(ctx_len_ptr + seq).to(tl.int32)
    start = split * tokens_per_split
    if start >= ctx_len:  # past this sequence's context: the merge reads no partials from here
        return
    end = tl.minimum(start + tokens_per_split, ctx_len)

    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    # Operands go to the dots as fp32: half-precision values are exact in TF32 (the dots'
    # precision for them), and the interpreter multiplies bf16 as raw integers.
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_kh
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.full((BLOCK_G,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, dtype=tl.float32)
    for tok0 in range(start, end, BLOCK_N):  # every tile holds at least one real position
        offs_n = tok0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block = tl.load(
            block_table_ptr + seq * stride_bt + offs_n // block_size, mask=mask_n, other=0
        ).to(tl.int64)
        slots = block * block_size + offs_n % block_size  # [N] int64
        k = tl.load(  # [D, N]
            k_base + slots[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = tl.dot(q, k.to(tl.float32), input_precision=PRECISION) * scale  # [G, N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        v = tl.load(  # [N, D]
            v_base + slots[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        m_i = m_new

    mask_gd = mask_g[:, None] & mask_d[None, :]
    if ONE_PASS:
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh
        o_ptrs += offs_d[None, :] * stride_od
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_gd)
    else:
        row = (seq * (GROUP * tl.num_programs(1)) + heads) * n_splits + split  # [G]
        tl.store(part_max_ptr + row, m_i, mask=mask_g)
        tl.store(part_sum_ptr + row, l_i, mask=mask_g)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_gd)


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [B, heads, D]
    part_acc_ptr,  # [B, heads, n_splits, D] float32
    part_max_ptr,  # [B, heads, n_splits] float32
    part_sum_ptr,  # [B, heads, n_splits] float32
    ctx_len_ptr,  # [B] int
    tokens_per_split,
    n_splits,
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits per chunk (MERGE_CHUNK): the same for every width
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    first = (seq * tl.num_programs(1) + head) * n_splits
    # Only the sequence's own splits, those the decode kernel wrote: the rest of a wide block
    # table (a CUDA graph's is as wide as the longest context it serves) costs nothing.
    ctx_len = tl.load(ctx_len_ptr + seq).to(tl.int32)
    own = tl.minimum((ctx_len + tokens_per_split - 1) // tokens_per_split, n_splits)
    total_max = tl.full((), float("-inf"), dtype=tl.float32)
    for c0 in range(0, own, BLOCK_S):
        mask_s = c0 + offs_s < own
        m = tl.load(part_max_ptr + first + c0 + offs_s, mask=mask_s, other=float("-inf"))
        total_max = tl.maximum(total_max, tl.reduce(m, 0, _maximum))  # split 0 holds position 0
    # The chunks and their lanes are the sequence's own, whatever the width: its output does
    # not depend on how wide the batch's block table is.
    total = tl.full((), 0.0, dtype=tl.float32)
    o = tl.full((BLOCK_D,), 0.0, dtype=tl.float32)
    for c0 in range(0, own, BLOCK_S):
        mask_s = c0 + offs_s < own
        row = first + c0 + offs_s  # [S]
        m = tl.load(part_max_ptr + row, mask=mask_s, other=float("-inf"))
        w = tl.exp(m - total_max)  # 0 for the masked lanes
        total += tl.reduce(w * tl.load(part_sum_ptr + row, mask=mask_s, other=0.0), 0, _add)
        acc = tl.load(
            part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        )
        o += tl.reduce(acc * w[:, None], 0, _add)  # [D]
    o_ptrs = out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, (o / total).to(out_ptr.dtype.element_ty), mask=mask_d)


def paged_decode_attention(
    q: torch.Tensor,  # [B, heads, D], one token per sequence
    cache: torch.Tensor,  # [2, kv_heads, num_blocks * block_size, D] one layer's K and V
    block_tables: torch.Tensor,  # [B, max_blocks] int, entries past a context never read
    ctx_lens: torch.Tensor,  # [B] int, 1..max_blocks * block_size, this token's K/V included
    block_size: int,
    scale: float,
    *,
    partition: int = PARTITION,  # context positions per split
) -> torch.Tensor:  # [B, heads, D], q's dtype
    """Check the arguments, then launch `_paged_decode_kernel` (and the merge when split).

    The loop it computes, per sequence b and query head h (kvh = h // (heads // kv_heads)):

    ```python
    n = ctx_lens[b]
    slots = [block_tables[b, p // block_size] * block_size + p % block_size for p in range(n)]
    k, v = cache[0, kvh, slots], cache[1, kvh, slots]  # [n, D]
    out[b, h] = softmax(k @ q[b, h] * scale) @ v
    ```
    """
    B, heads, D = q.shape
    if cache.dim() != 4 or cache.shape[0] != 2 or cache.shape[3] != D:
        raise ValueError(f"cache must be [2, kv_heads, slots, {D}], got {tuple(cache.shape)}")
    kv_heads = cache.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or ctx_lens.shape != (B,):
        raise ValueError(
            f"block_tables [{B}, max_blocks] and ctx_lens [{B}], got "
            f"{tuple(block_tables.shape)} and {tuple(ctx_lens.shape)}"
        )
    if q.dtype != cache.dtype:
        raise ValueError(f"q and cache must share a dtype, got {q.dtype} and {cache.dtype}")
    if partition < 16:
        raise ValueError(f"partition must be >= 16 positions, got {partition}")
    out = torch.empty(B, heads, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = heads // kv_heads
    block_n = min(64, pow2_at_least(partition))
    n_splits = cdiv(block_tables.shape[1] * block_size, partition)
    one_pass = n_splits == 1
    if one_pass:
        part_acc = part_max = part_sum = out  # never touched
    else:
        part_acc = torch.empty(B, heads, n_splits, D, dtype=torch.float32, device=q.device)
        part_max = torch.empty(B, heads, n_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    k, v = cache[0], cache[1]
    block_d = max(16, pow2_at_least(D))
    _paged_decode_kernel[(B, kv_heads, n_splits)](
        q, k, v, block_tables, ctx_lens, out, part_acc, part_max, part_sum,
        scale, block_size, partition, n_splits,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group,
        HEAD_DIM=D,
        BLOCK_G=max(16, pow2_at_least(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        ONE_PASS=one_pass,
        PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )  # fmt: skip
    if not one_pass:
        _merge_splits_kernel[(B, heads)](
            out, part_acc, part_max, part_sum, ctx_lens, partition, n_splits,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=D,
            BLOCK_D=block_d,
            BLOCK_S=MERGE_CHUNK,
        )  # fmt: skip
    return out
