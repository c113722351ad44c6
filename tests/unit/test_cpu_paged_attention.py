"""The C++ CPU decode attention (kernels/csrc/paged_attention_cpu.cpp) against a float64 loop
over each sequence's own blocks, and against the torch path it replaces.

CI machines have a C++ compiler, so the kernels must build there: a failed build fails these
tests instead of skipping them.
"""

from __future__ import annotations

import math

import pytest
import torch

from peftserve.kernels import cpu_ext
from peftserve.layers.attention import AttentionMetadata, paged_attention
from peftserve.layers.backend import CpuBackend
from tests.backends import counted_cpu_backend


@pytest.fixture(params=["default", "generic"])
def op(request, monkeypatch):
    """The op as built here (AVX-512 code for head_dim 64/128 and up to 8 query heads per KV
    head where the CPU has it, AVX2 code for head_dim 16/32/64/128 where it has AVX2 and FMA)
    and its plain loops (what other CPUs and shapes run)."""
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    generic = request.param == "generic"
    return lambda *args: torch.ops.peftserve_cpu.paged_decode_attention(*args, generic)


def make_case(B, heads, kv_heads, D, bs, max_len, dtype, seed=0):
    """A cache whose every slot not in some sequence's context holds NaN, block tables drawn
    from a shuffled pool, lengths that rarely fill their last block."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = B * (-(-max_len // bs)) + 3
    cache = torch.full((2, kv_heads, num_blocks * bs, D), float("nan"))
    lens = torch.randint(1, max_len + 1, (B,), generator=g)
    lens[0] = max_len
    max_blocks = -(-max_len // bs)
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(B, max_blocks, dtype=torch.long)
    for b in range(B):
        n = -(-int(lens[b]) // bs)
        tables[b, :n] = torch.tensor([pool.pop() for _ in range(n)])
        tables[b, n:] = pool[0]  # padding entries point at a NaN block, never read
        slots = (tables[b, :n, None] * bs + torch.arange(bs)).flatten()[: lens[b]]
        cache[:, :, slots] = torch.randn(2, kv_heads, int(lens[b]), D, generator=g)
    q = torch.randn(B, heads, D, generator=g)
    return q.to(dtype), cache.to(dtype), tables, lens


def reference(q, cache, tables, lens, bs, scale):
    """float64, one sequence and one query head at a time."""
    B, H, D = q.shape
    kvh = cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        slots = (tables[b, :, None] * bs + torch.arange(bs)).flatten()[:n]
        for h in range(H):
            kh = h // (H // kvh)
            k, v = cache[0, kh, slots].double(), cache[1, kh, slots].double()
            p = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize(
    "B, heads, kv_heads, D, bs, max_len",
    [
        (5, 6, 2, 16, 4, 37),
        (3, 9, 3, 64, 16, 70),  # SmolLM2's heads
        (4, 4, 4, 32, 8, 8),
        (1, 8, 1, 64, 16, 1),
        (3, 14, 2, 64, 16, 45),  # 7 query heads per KV head
        (2, 8, 2, 128, 16, 33),  # head_dim 128
        (2, 18, 2, 64, 16, 20),  # 9 per KV head: beyond the AVX-512 code's 8 (AVX2 code)
        # contexts past one split of 256 positions: merged splits
        (2, 9, 3, 64, 16, 700),
        (3, 6, 2, 16, 5, 530),  # blocks of 5: splits start inside a block
        (2, 8, 2, 128, 16, 513),  # one position past a split
        (1, 4, 1, 32, 16, 512),  # exactly two splits
    ],
)
def test_matches_float64_reference_and_never_reads_past_a_context(
    op, dtype, atol, B, heads, kv_heads, D, bs, max_len
):
    q, cache, tables, lens = make_case(B, heads, kv_heads, D, bs, max_len, dtype)
    scale = 1 / math.sqrt(D)
    out = torch.empty_like(q)
    op(out, q, cache, tables, lens, bs, scale)
    assert torch.isfinite(out).all()  # every NaN slot outside the contexts stayed unread
    ref = reference(q, cache, tables, lens, bs, scale)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


def test_each_sequence_gets_what_it_gets_alone(op):
    # Batch invariance at the kernel: a sequence's output bits do not depend on its neighbours
    # (nor, past 256 positions, on how many splits the others have).
    for D, bs, max_len in ((16, 4, 29), (64, 16, 29), (64, 16, 900)):
        q, cache, tables, lens = make_case(7, 6, 2, D, bs, max_len, torch.bfloat16, seed=3)
        out = torch.empty_like(q)
        op(out, q, cache, tables, lens, bs, 0.25)
        for b in range(7):
            alone = torch.empty_like(q[b : b + 1])
            op(alone, q[b : b + 1], cache, tables[b : b + 1], lens[b : b + 1], bs, 0.25)
            assert torch.equal(alone[0], out[b])


def test_a_build_with_avx2_runs_the_avx2_code():
    # 9 query heads per KV head: a shape the AVX-512 code leaves, so every build with AVX2, FMA
    # and F16C runs the AVX2 code for it, and one without runs the plain loops. The AVX2 code
    # sums each score's lanes in another order than the plain loops' vectorized reduction, so
    # some fp32 bits differ where it ran (both match the float64 loop above); without it the
    # default op is the plain loops, bit for bit.
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    avx2 = {"__AVX2__", "__FMA__", "__F16C__"} <= cpu_ext.build_macros()
    q, cache, tables, lens = make_case(3, 18, 2, 64, 16, 300, torch.float32, seed=11)
    fast, plain = torch.empty_like(q), torch.empty_like(q)
    torch.ops.peftserve_cpu.paged_decode_attention(fast, q, cache, tables, lens, 16, 0.125, False)
    torch.ops.peftserve_cpu.paged_decode_attention(plain, q, cache, tables, lens, 16, 0.125, True)
    assert torch.equal(fast, plain) != avx2
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_reads_q_through_its_strides(op):
    # The engine hands q as a view of the fused q/k rows: [T, heads + kv_heads, D][:, :heads].
    for D in (16, 64):
        q, cache, tables, lens = make_case(4, 6, 2, D, 4, 19, torch.float32, seed=5)
        qk = torch.cat([q, torch.full((4, 2, D), float("nan"))], dim=1)
        view = qk[:, :6]
        assert not view.is_contiguous()
        a, b = torch.empty_like(q), torch.empty_like(q)
        op(a, view, cache, tables, lens, 4, 0.25)
        op(b, q, cache, tables, lens, 4, 0.25)
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_takes_the_kernel_and_agrees_with_the_torch_path(dtype):
    # A decode step of 4 sequences as the model runner describes it (block tables, mask, lens).
    B, bs, L = 4, 4, 21
    q, cache, tables, lens = make_case(B, 6, 2, 16, bs, L, dtype, seed=7)
    cache = torch.nan_to_num(cache)  # the torch path reads the padding (masked) positions
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(B, dtype=torch.long),
        num_decodes=B,
        block_size=bs,
        decode_blocks=tables,
        decode_mask=(torch.arange(tables.shape[1] * bs)[None] < lens[:, None])[
            :, None, None, None
        ],
        decode_lens=lens,
        prefills=(),
    )
    k = v = torch.empty(B, 2, 16, dtype=dtype)  # already in the cache; unused by decodes
    backend, calls = counted_cpu_backend()
    ours = paged_attention(q, k, v, cache, meta, 0.25, backend)
    assert calls["paged_decode_attention"] == 1, "a CPU decode step did not use the C++ kernel"
    # as without a compiler: the torch path
    torch_path = paged_attention(q, k, v, cache, meta, 0.25, CpuBackend(native=False))
    assert calls["paged_decode_attention"] == 1
    atol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), torch_path.float(), atol=atol, rtol=0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(lens=torch.tensor([0, 3])), "context length 0"),
        (lambda c: c.update(lens=torch.tensor([3, 9])), "does not fit its block table"),
        (lambda c: c.update(tables=torch.tensor([[0, 1], [99, 2]])), "outside the cache"),
        (lambda c: c.update(q=c["q"].bfloat16(), out=c["out"].bfloat16()), "one dtype"),
        (lambda c: c.update(tables=c["tables"].int()), "int64"),
        (lambda c: c.update(q=torch.randn(2, 5, 16), out=torch.empty(2, 5, 16)), "multiple"),
    ],
)
def test_bad_arguments_raise_a_clear_error(op, mutate, message):
    case = {
        "out": torch.empty(2, 4, 16),
        "q": torch.randn(2, 4, 16),
        "cache": torch.randn(2, 2, 8 * 4, 16),
        "tables": torch.tensor([[0, 1], [2, 3]]),
        "lens": torch.tensor([5, 8]),
    }
    mutate(case)
    with pytest.raises(RuntimeError, match=message):
        op(case["out"], case["q"], case["cache"], case["tables"], case["lens"], 4, 0.25)
