"""The int8 / int4 weight-only matrix-vector kernels (kernels/csrc/gemv_quant_cpu.cpp,
kernels/quant.py) against a float64 reference over the dequantized weights at odd sizes and
every row count 1..8 (and a few larger), the quantization error itself, batch invariance bit for
bit, the vector code against the plain loops, and their argument checks."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels import cpu_ext, quant
from tests.kernels.threads import results_at_thread_counts


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"

BF16 = torch.bfloat16
KINDS = ["int8", "int4"]
# (N, K): a narrow last tile, an odd K, K = 1, N below one tile, K not a multiple of the group,
# SmolLM2's q/k/v and down
SHAPES = [(77, 33), (423, 73), (40, 1), (5, 213), (17, 100), (960, 576), (576, 1536)]
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 70]


def rand(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(BF16)


def op(kind: str):
    return getattr(torch.ops.peftserve_cpu, f"gemv_{kind}")


def block_max(x: torch.Tensor, block: int) -> torch.Tensor:
    """|x|'s largest magnitude over each block of `block` columns, for every column."""
    M, K = x.shape
    a = torch.nn.functional.pad(x.double().abs(), (0, -K % block))
    return a.view(M, -1, block).amax(2).repeat_interleave(block, 1)[:, :K]


def within_rounding(got: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, b: torch.Tensor | None):
    """got is the float64 sum over the dequantized weights rounded once to bf16, give or take
    fp32 accumulation (int4 sums 128 + u, hence the larger magnitude) and the AVX2 code's
    rounding of x (quant.py: within 2^-15 of its block's largest magnitude)."""
    want = quant.linear_reference(x, wq, b)
    w = quant.dequantize(wq, x.shape[1])
    mag = x.double().abs() @ w.abs().T
    if wq.dtype == torch.uint8:
        mag = mag * 200
    block = quant.GROUP if wq.dtype == torch.uint8 else quant.X_BLOCK
    x_rounding = block_max(x, block) @ w.abs().T * 2.0**-15
    tol = want.abs() * 2.0**-8 + mag * x.shape[1] * 2.0**-23 + x_rounding + 1e-30
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g} beyond bf16 rounding"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N,K", SHAPES)
def test_quantization_error_is_bounded(N, K, kind):
    """int8: within half a step (max|W[n]| / 254) of W; int4: within half a group's step."""
    w = rand(torch.Generator().manual_seed(N * K), N, K, std=0.1)
    wq = quant.pack(w, kind)
    err = (quant.dequantize(wq, K) - w.double()).abs()
    if kind == "int8":
        assert wq.dtype == torch.int8 and wq.shape == (N, 2 * ((K + 1) // 2) + 4)
        step = w.double().abs().amax(dim=1, keepdim=True) / 127
    else:
        G = -(-K // quant.GROUP)
        assert wq.dtype == torch.uint8 and wq.shape == (N, G, quant.GROUP // 2 + 8)
        wg = torch.cat([w.double(), w.double()[:, :1].expand(N, G * quant.GROUP - K)], 1)
        wg = wg.view(N, G, quant.GROUP)
        step = ((wg.amax(2) - wg.amin(2)) / 15).repeat_interleave(quant.GROUP, 1)[:, :K]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_int4_keeps_constant_groups_exact():
    w = torch.full((20, 64), 0.25, dtype=BF16)
    w[3, 32:] = -1.5
    assert torch.equal(quant.dequantize(quant.pack(w, "int4"), 64), w.double())


@pytest.mark.parametrize("kind", KINDS)
def test_a_result_does_not_depend_on_the_thread_count(kind):
    """Every tile computed once at every thread count (129 tiles, split unevenly over 3)."""
    g = torch.Generator().manual_seed(11)
    wq = quant.pack(rand(g, 4099, 96, std=0.1), kind)
    b = rand(g, 4099)
    for M in (1, 3, 9):
        x = rand(g, M, 96)
        outs = results_at_thread_counts(lambda: quant.linear(x, wq, b))  # noqa: B023
        within_rounding(outs[0], x, wq, b)
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), M


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K", SHAPES)
def test_against_float64_every_row_count(N, K, bias, kind):
    g = torch.Generator().manual_seed(N + 7 * K)
    w, b = rand(g, N, K, std=0.1), (rand(g, N) if bias else None)
    wq = quant.pack(w, kind)
    amx = torch.ops.peftserve_cpu.gemv_bf16_amx()
    tail = N - N % 16  # the narrower last tile's rows: the vector code on AMX CPUs too
    for M in ROWS:
        x = rand(g, M, K)
        got = quant.linear(x, wq, b)
        within_rounding(got, x, wq, b)
        plain, vector = torch.empty(M, N, dtype=BF16), torch.empty(M, N, dtype=BF16)
        op(kind)(plain, x, wq, b, True)
        within_rounding(plain, x, wq, b)
        op(kind)(vector, x, wq, b, False, False)  # no AMX: the vector code (or the plain loops)
        within_rounding(vector, x, wq, b)
        assert torch.equal(got[:, tail:], vector[:, tail:])
        assert amx or torch.equal(got, vector)


@pytest.mark.parametrize("kind", KINDS)
def test_x_of_any_range_within_rounding(kind):
    """Rows of x whose blocks span 2^20 (an outlier among small values: the AVX2 code rounds
    the small ones), rows of values just above the smallest normal against weights near 2^100
    (the AVX2 code's scales below 2^-126; no subnormal x, which vdpbf16ps reads as zero), a
    row of zeros, each alone and in one batch."""
    g = torch.Generator().manual_seed(11)
    N, K = 48, 200
    w = rand(g, N, K, std=0.1)
    big = (w.float() * 2.0**100).to(BF16)
    spread = torch.randn(3, K, generator=g) * 2.0**-10
    spread[:, ::37] = 2.0**10 * torch.sign(torch.randn(3, K // 37 + 1, generator=g))
    size = 0.5 + 3.5 * torch.rand(3, K, generator=g)  # |x| / 2^e in [0.5, 4]: all normal
    sign = torch.sign(torch.randn(3, K, generator=g))
    tiny = sign * size * torch.tensor([[2.0**-125], [2.0**-118], [2.0**-100]])
    cases = [(w, torch.cat([spread, torch.zeros(1, K)]).to(BF16)), (big, tiny.to(BF16))]
    for weights, x in cases:
        wq = quant.pack(weights, kind)
        assert quant.dequantize(wq, K).abs().amax() > 0
        got = quant.linear(x, wq, None)
        within_rounding(got, x, wq, None)
        for m in range(x.shape[0]):
            assert torch.equal(quant.linear(x[m : m + 1], wq, None), got[m : m + 1])
    assert (quant.linear(cases[0][1][3:], quant.pack(w, kind), None) == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_x_stays_in_its_row(kind):
    """An infinite or NaN x makes its own row's outputs non-finite, and no other row's."""
    g = torch.Generator().manual_seed(12)
    N, K = 40, 96
    wq = quant.pack(rand(g, N, K, std=0.1), kind)
    x = rand(g, 4, K)
    x[1, 5], x[2, 70] = float("inf"), float("nan")
    got = quant.linear(x, wq, None)
    assert not got[1:3].isfinite().any()
    assert got[[0, 3]].isfinite().all()
    assert torch.equal(got[[0, 3]], quant.linear(x[[0, 3]], wq, None))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N,K", [(423, 73), (960, 576)])
def test_a_rows_result_does_not_depend_on_the_batch(N, K, kind):
    g = torch.Generator().manual_seed(3)
    wq, b = quant.pack(rand(g, N, K, std=0.1), kind), rand(g, N)
    x = rand(g, 40, K)
    alone = torch.cat([quant.linear(x[i : i + 1], wq, b) for i in range(40)])
    for M in (2, 5, 8, 9, 40):
        assert torch.equal(quant.linear(x[:M], wq, b), alone[:M])


def test_bf16_layout_goes_to_the_bf16_kernel():
    g = torch.Generator().manual_seed(5)
    w, x = rand(g, 33, 40, std=0.1), rand(g, 3, 40)
    wp = quant.pack(w, "bf16")
    assert torch.equal(quant.dequantize(wp, 40), w.double())
    assert quant.linear(x, wp, None).shape == (3, 33)


def test_pack_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="bfloat16"):
        quant.pack(torch.zeros(4, 4), "int8")
    with pytest.raises(ValueError, match="weights must be"):
        quant.pack(torch.zeros(4, 4, dtype=BF16), "int3")


@pytest.mark.parametrize("kind", KINDS)
def test_argument_checks(kind):
    g = torch.Generator().manual_seed(1)
    N, K = 20, 64
    wq, x = quant.pack(rand(g, N, K, std=0.1), kind), rand(g, 2, K)
    out = torch.empty(2, N, dtype=BF16)
    f = op(kind)
    with pytest.raises(RuntimeError, match=f"gemv_{kind}.*bfloat16"):
        f(out, x.float(), wq, None)
    with pytest.raises(RuntimeError, match=f"gemv_{kind}"):  # K does not match the packing
        f(out, rand(g, 2, K + 40), wq, None)
    with pytest.raises(RuntimeError, match=f"gemv_{kind}.*out must be"):
        f(torch.empty(2, N + 1, dtype=BF16), x, wq, None)
    with pytest.raises(RuntimeError, match=f"gemv_{kind}.*bias"):
        f(out, x, wq, torch.zeros(N + 1, dtype=BF16))
    with pytest.raises(RuntimeError, match=f"gemv_{kind}.*w must be"):
        f(out, x, quant.pack(rand(g, N, K), "int4" if kind == "int8" else "int8"), None)
    f(out, x, wq, None)  # the op serves on after refusing
    within_rounding(out, x, wq, None)
    if kind == "int4":
        bad = torch.zeros(N, 2, 12, dtype=torch.uint8)  # a group of 8 columns
        with pytest.raises(RuntimeError, match="group size"):
            f(out, x, bad, None)
