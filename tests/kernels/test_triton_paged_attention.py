"""The Triton paged decode attention (interpreted when there is no GPU) against the gather +
SDPA path it replaces (the reference backend's decode_attention): head dims 64 and 128, GQA
ratios 1/3/4/8, block sizes, ragged contexts from 1 position to several splits, three dtypes."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels.triton_fused import rotary_and_cache_triton
from peftserve.kernels.triton_paged_attention import paged_decode_attention
from peftserve.layers.attention import AttentionMetadata
from peftserve.layers.backend import Backend
from tests.kernels.lowrank_cases import HAS_CUDA, KERNEL_DEVICE, assert_close, requires_cuda

# (dtype, atol, rtol) against SDPA in the same dtype
TOLERANCES = [(torch.float32, 2e-5, 1e-4), (torch.bfloat16, 3e-2, 3e-2),
              (torch.float16, 4e-3, 4e-3)]  # fmt: skip


def make_case(B, heads, kv_heads, D, bs, lens, dtype, seed=0):
    """Block tables drawn from a shuffled pool (padding entries point at a real block of
    another sequence), every other slot of the cache random too."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    max_blocks = -(-int(lens.max()) // bs)
    num_blocks = B * max_blocks + 3
    cache = torch.randn(2, kv_heads, num_blocks * bs, D, generator=g)
    pool = torch.randperm(num_blocks, generator=g)
    tables = pool[: B * max_blocks].view(B, max_blocks).clone()
    q = torch.randn(B, heads, D, generator=g)
    dev = KERNEL_DEVICE
    return q.to(dev, dtype), cache.to(dev, dtype), tables.to(dev), lens.to(dev)


def gather_sdpa(q, cache, tables, lens, bs, scale):
    mask = torch.arange(tables.shape[1] * bs, device=q.device)[None, :] < lens[:, None]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.long, device=q.device),
        num_decodes=q.shape[0], block_size=bs, decode_blocks=tables,
        decode_mask=mask[:, None, None, None, :], decode_lens=lens, prefills=(),
    )  # fmt: skip
    return Backend().decode_attention(q, cache, meta, scale)


HEAD_LAYOUTS = [(4, 4, 64), (9, 3, 64), (8, 2, 128), (16, 2, 64)]  # GQA 1, 3 (SmolLM2), 4, 8
SPLITS = [
    (16, [1, 37, 70], 512),  # one pass; a context of one position
    (8, [100, 1, 33], 32),  # split over 4 programs; sequences that stop in split 0
    (16, [16, 80], 16),  # a whole block, and a split per block
]


def grid() -> list[tuple]:
    """Every head layout and split in every dtype on a GPU. Interpreted (a case takes 5-20 s
    there), fp32 takes every layout and split, bf16 two layouts (GQA 3 and 4, head dims 64
    and 128) and fp16 one: the dtype changes only the loads' and the store's conversions."""
    half = {torch.bfloat16: HEAD_LAYOUTS[1:3], torch.float16: HEAD_LAYOUTS[2:3]}
    return [
        (*tol, *heads, *split)
        for tol in TOLERANCES
        for heads in HEAD_LAYOUTS
        if HAS_CUDA or tol[0] == torch.float32 or heads in half[tol[0]]
        for split in SPLITS
    ]


@pytest.mark.parametrize("dtype, atol, rtol, heads, kv_heads, D, bs, lens, partition", grid())
def test_matches_gather_sdpa(dtype, atol, rtol, heads, kv_heads, D, bs, lens, partition):
    q, cache, tables, ctx = make_case(len(lens), heads, kv_heads, D, bs, lens, dtype)
    scale = D**-0.5
    out = paged_decode_attention(q, cache, tables, ctx, bs, scale, partition=partition)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, gather_sdpa(q, cache, tables, ctx, bs, scale), atol, rtol)


def test_reads_only_the_context():
    """NaN in every cache slot past each context and in the padding blocks: none is read."""
    bs, lens = 8, [3, 20, 41]
    q, cache, tables, ctx = make_case(3, 8, 2, 64, bs, lens, torch.float32, seed=1)
    expected = gather_sdpa(q, cache, tables, ctx, bs, 0.125)
    poisoned = torch.full_like(cache, float("nan"))
    for b, n in enumerate(lens):
        slots = (tables[b, :, None] * bs + torch.arange(bs, device=cache.device)).flatten()[:n]
        poisoned[:, :, slots] = cache[:, :, slots]
    for partition in (512, 16):
        out = paged_decode_attention(q, poisoned, tables, ctx, bs, 0.125, partition=partition)
        assert_close(out, expected, 2e-5, 1e-4)


def test_splits_past_a_context_write_nothing_and_are_never_read(monkeypatch):
    """The partial states start as NaN: a sequence's splits past its context stay so (their
    programs return at once) and its output still matches, so the merge never reads them (on
    a GPU they hold whatever the memory held). The splits inside every context are written."""
    bs, lens, partition = 8, [3, 20, 41], 16  # 3 splits: 1, 2 and 3 of them in a context
    q, cache, tables, ctx = make_case(3, 8, 2, 64, bs, lens, torch.float32, seed=5)
    expected = gather_sdpa(q, cache, tables, ctx, bs, 0.125)
    made, empty = [], torch.empty

    def nan_empty(*size, **kwargs):
        t = empty(*size, **kwargs)
        if t.is_floating_point():
            made.append(t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, **kw: nan_empty(t.shape, dtype=t.dtype, device=t.device))
    out = paged_decode_attention(q, cache, tables, ctx, bs, 0.125, partition=partition)
    monkeypatch.undo()
    assert_close(out, expected, 2e-5, 1e-4)
    parts = [t for t in made if t.dim() >= 3 and t.shape[:3] == (3, 8, 3)]  # acc, max, sum
    assert len(parts) == 3, [tuple(t.shape) for t in made]
    for b, n in enumerate(lens):
        own = -(-n // partition)
        for part in parts:
            assert not part[b, :, :own].isnan().any(), (b, n)
            assert part[b, :, own:].isnan().all(), (b, n)


def test_strided_query_and_odd_head_dim():
    """q as the rotary leaves it (a view into the fused qkv rows), head_dim 80."""
    bs, lens, heads, kv_heads, D = 4, [5, 13], 6, 2, 80
    q, cache, tables, ctx = make_case(2, heads, kv_heads, D, bs, lens, torch.float32, seed=2)
    qkv = torch.randn(2, heads + 2 * kv_heads, D, device=q.device)
    qkv[:, :heads] = q
    view = qkv[:, :heads]
    assert not view.is_contiguous()
    out = paged_decode_attention(view, cache, tables, ctx, bs, D**-0.5, partition=16)
    assert_close(out, gather_sdpa(q, cache, tables, ctx, bs, D**-0.5), 2e-5, 1e-4)


def test_refuses_mismatched_layouts():
    q, cache, tables, ctx = make_case(2, 4, 2, 16, 4, [3, 5], torch.float32)
    with pytest.raises(ValueError, match="group"):
        paged_decode_attention(q[:, :3], cache, tables, ctx, 4, 0.25)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.half(), cache, tables, ctx, 4, 0.25)
    with pytest.raises(ValueError, match="ctx_lens"):
        paged_decode_attention(q, cache, tables, ctx[:1], 4, 0.25)


@requires_cuda
@pytest.mark.gpu
def test_offsets_past_two_to_the_31_elements():
    """A cache of 2 x 8 x 2.2M slots x 128 (9 GB of bf16): the last KV head's blocks lie past
    2^31 elements from the base, so 32-bit offsets would read the wrong rows. The rotary + KV
    write lands its rows there too."""
    kv_heads, D, bs, slots = 8, 128, 16, 2_200_000 // 16 * 16
    cache = torch.zeros(2, kv_heads, slots, D, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([40, 17])
    tables = torch.tensor([[slots // bs - 1, 5, slots // bs - 9], [slots // bs - 4, 0, 0]])
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        flat = (tables[b, pos // bs] * bs + pos % bs).cuda()
        cache[:, :, flat] = torch.randn(2, kv_heads, n, D, generator=g).cuda().bfloat16()
    q = torch.randn(2, 32, D, generator=g).cuda().bfloat16()
    tables, lens = tables.cuda(), lens.cuda()
    out = paged_decode_attention(q, cache, tables, lens, bs, D**-0.5, partition=16)
    assert_close(out, gather_sdpa(q, cache, tables, lens, bs, D**-0.5), 3e-2, 3e-2)

    qkv = torch.randn(1, (32 + 2 * kv_heads) * D, generator=g).cuda().bfloat16()
    ones, zeros = torch.ones(1, D, device="cuda"), torch.zeros(1, D, device="cuda")
    slot = torch.tensor([slots - 1], device="cuda")
    rotary_and_cache_triton(qkv, ones.bfloat16(), zeros.bfloat16(), cache, slot, 32, kv_heads)
    k, v = qkv.view(32 + 2 * kv_heads, D)[32:].split(kv_heads)
    assert torch.equal(cache[0, :, slots - 1], k) and torch.equal(cache[1, :, slots - 1], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partition", [None, 16])
def test_a_sequences_output_does_not_depend_on_its_batch(dtype, partition):
    """A sequence's splits are the same alone and beside longer sequences (a wider block table:
    more splits, the extra ones empty for it, more merge chunks at partition 16), so its output
    is the same bits; and the merge over more than one chunk matches gather + SDPA."""
    bs, lens = 16, [100, 1, 1100]
    kwargs = {} if partition is None else {"partition": partition}
    q, cache, tables, ctx = make_case(3, 3, 1, 64, bs, lens, dtype, seed=4)
    together = paged_decode_attention(q, cache, tables, ctx, bs, 0.125, **kwargs)
    atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    assert_close(together, gather_sdpa(q, cache, tables, ctx, bs, 0.125), atol, rtol)
    for b, n in enumerate(lens):
        width = -(-n // bs)
        alone = paged_decode_attention(q[b : b + 1], cache, tables[b : b + 1, :width],
                                       ctx[b : b + 1], bs, 0.125, **kwargs)  # fmt: skip
        assert torch.equal(alone[0], together[b]), (b, n)
