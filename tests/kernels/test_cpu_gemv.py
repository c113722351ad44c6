"""The bf16 matrix-vector kernel (kernels/csrc/gemv_bf16_cpu.cpp, kernels/gemv.py) against a
float64 reference at odd sizes and every row count 1..8 (and a few larger), its layout round
trip, batch invariance bit for bit, the vector code against the plain loops, and its argument
checks."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels import cpu_ext, gemv
from tests.kernels.threads import results_at_thread_counts


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"

BF16 = torch.bfloat16
# (N, K): a narrow last tile, an odd K, K = 1, N below one tile, SmolLM2's q/k/v and down
SHAPES = [(77, 33), (423, 73), (40, 1), (5, 213), (960, 576), (576, 1536)]
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 70]


def rand(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(BF16)


def within_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """got is the float64 sum rounded once to bf16, give or take fp32 accumulation: within half
    a bf16 ulp of the sum plus K fp32 ulps of sum |x||w|."""
    want = gemv.linear_reference(x, w, b)
    mag = x.double().abs() @ w.double().abs().T
    tol = want.abs() * 2.0**-8 + mag * x.shape[1] * 2.0**-23 + 1e-30
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g} beyond bf16 rounding"


@pytest.mark.parametrize("N,K", SHAPES)
def test_pack_round_trip(N, K):
    w = rand(torch.Generator().manual_seed(N * K), N, K)
    wp = gemv.pack(w)
    assert wp.shape == (N, (K + 1) // 2, 2)
    assert torch.equal(gemv.unpack(wp, K), w)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K", SHAPES)
def test_against_float64_every_row_count(N, K, bias):
    g = torch.Generator().manual_seed(N + 7 * K)
    w, b = rand(g, N, K, std=0.1), (rand(g, N) if bias else None)
    wp = gemv.pack(w)
    for M in ROWS:
        x = rand(g, M, K)
        within_rounding(gemv.linear(x, wp, b), x, w, b)


@pytest.mark.parametrize("N,K", [(423, 73), (960, 576)])
def test_a_rows_result_does_not_depend_on_the_batch(N, K):
    """Batch invariance: each row alone gives its bits in every batch of 1..40 rows."""
    g = torch.Generator().manual_seed(3)
    w, b = gemv.pack(rand(g, N, K, std=0.1)), rand(g, N)
    x = rand(g, 40, K)
    alone = torch.cat([gemv.linear(x[i : i + 1], w, b) for i in range(40)])
    for M in [*range(1, 10), 16, 17, 33, 40]:
        assert torch.equal(gemv.linear(x[:M], w, b), alone[:M]), M


@pytest.mark.parametrize("N,K", [(4099, 65), (64, 576), (33, 8)])
def test_a_result_does_not_depend_on_the_thread_count(N, K):
    """Every tile computed once at every thread count: 129 tiles (split unevenly over 2 and 3
    threads), 2, and 2."""
    g = torch.Generator().manual_seed(N)
    w = rand(g, N, K, std=0.1)
    wp, b = gemv.pack(w), rand(g, N)
    for M in (1, 3, 9):
        x = rand(g, M, K)
        outs = results_at_thread_counts(lambda: gemv.linear(x, wp, b))  # noqa: B023
        within_rounding(outs[0], x, w, b)
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), M


@pytest.mark.parametrize("N,K", [(77, 33), (960, 576), (40, 1)])
def test_vector_code_equals_the_plain_loops(N, K):
    """The AVX-512 BF16 / AVX2 code (amx=False: where AMX serves, its own rounding is checked
    against float64 by the tests above) sums in the plain loops' order."""
    g = torch.Generator().manual_seed(5)
    w, b = gemv.pack(rand(g, N, K, std=0.1)), rand(g, N)
    for M in (1, 4, 8, 11):
        x = rand(g, M, K)
        fast, plain = torch.empty(M, N, dtype=BF16), torch.empty(M, N, dtype=BF16)
        torch.ops.peftserve_cpu.gemv_bf16(fast, x, w, b, False, False)
        torch.ops.peftserve_cpu.gemv_bf16(plain, x, w, b, True)
        assert torch.equal(fast, plain)


def test_amx_serves_where_the_cpu_and_the_build_have_it():
    """The kernels take AMX where /proc/cpuinfo lists amx_bf16 (Linux grants it since 5.16) and
    the build's -march has it (make test-march's builds for other CPUs do not), and only there;
    its rows of full tiles differ from the vector code's by rounding alone, the narrower last
    tile's rows not at all."""
    serves = ("amx_bf16" in cpu_ext._cpu_signature().split()
              and "__AMX_BF16__" in cpu_ext.build_macros())  # fmt: skip
    assert torch.ops.peftserve_cpu.gemv_bf16_amx() == serves
    if not serves:
        return
    # Rows of +2^20, 30 small values, -2^20 (one AMX instruction's 32 columns): the sum is the
    # small values' with fp32 roundings at 2^20's scale, which the two orders round apart.
    g = torch.Generator().manual_seed(11)
    w = torch.randn(77, 32, generator=g)
    w[:, 0], w[:, -1] = 2.0**20, -(2.0**20)
    w, x = w.to(BF16), torch.ones(5, 32, dtype=BF16)
    amx, vector = torch.empty(5, 77, dtype=BF16), torch.empty(5, 77, dtype=BF16)
    torch.ops.peftserve_cpu.gemv_bf16(amx, x, gemv.pack(w), None)
    torch.ops.peftserve_cpu.gemv_bf16(vector, x, gemv.pack(w), None, False, False)
    within_rounding(amx, x, w, None)
    assert torch.equal(amx[:, 64:], vector[:, 64:])
    assert (amx[:, :64] != vector[:, :64]).float().mean() > 0.5


def test_strided_rows_and_leading_dims():
    """x with a row stride wider than K (a column slice) and a column-strided x (copied by the
    launcher); out rows may be a slice of a wider tensor."""
    g = torch.Generator().manual_seed(9)
    w = rand(g, 70, 45, std=0.1)
    wp = gemv.pack(w)
    wide = rand(g, 6, 100)
    x = wide[:, 10:55]
    want = gemv.linear(x.contiguous(), wp, None)
    assert torch.equal(gemv.linear(x, wp, None), want)
    assert torch.equal(gemv.linear(x.T.contiguous().T, wp, None), want)  # column-strided
    assert torch.equal(gemv.linear(x.reshape(2, 3, 45), wp, None), want.view(2, 3, 70))
    out = torch.zeros(6, 90, dtype=BF16)
    torch.ops.peftserve_cpu.gemv_bf16(out[:, 5:75], x, wp, None)
    assert torch.equal(out[:, 5:75], want) and not out[:, :5].any() and not out[:, 75:].any()


def test_zero_rows():
    wp = gemv.pack(torch.ones(33, 8, dtype=BF16))
    assert gemv.linear(torch.ones(0, 8, dtype=BF16), wp, None).shape == (0, 33)


def _call(out=None, x=None, w=None, bias=None):
    x = torch.ones(2, 8, dtype=BF16) if x is None else x
    w = gemv.pack(torch.ones(16, 8, dtype=BF16)) if w is None else w
    out = torch.empty(2, 16, dtype=BF16) if out is None else out
    torch.ops.peftserve_cpu.gemv_bf16(out, x, w, bias)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"x": torch.ones(2, 8)}, "must be bfloat16"),
        ({"w": torch.ones(16, 4, 2)}, "must be bfloat16"),
        ({"out": torch.empty(2, 16)}, "must be bfloat16"),
        ({"x": torch.ones(2, 7, dtype=BF16)[:, ::2]}, "contiguous rows"),
        ({"x": torch.ones(2, 2, 8, dtype=BF16)}, "x must be"),
        ({"w": torch.ones(16, 8, dtype=BF16)}, "w must be"),
        ({"w": torch.ones(16, 2, 4, dtype=BF16).transpose(1, 2)}, "w must be"),
        ({"w": torch.ones(16, 5, 2, dtype=BF16)}, "w packs"),
        ({"out": torch.empty(2, 15, dtype=BF16)}, "out must be"),
        ({"out": torch.empty(3, 16, dtype=BF16)}, "out must be"),
        ({"out": torch.empty(16, 2, dtype=BF16).T}, "out must be"),
        ({"out": torch.empty(1, 16, dtype=BF16).expand(2, 16)}, "out must be|overlap"),
        ({"bias": torch.ones(15, dtype=BF16)}, "bias must be"),
        ({"bias": torch.ones(16)}, "bias must be"),
        ({"x": torch.ones(2, 8, dtype=BF16).to_sparse()}, "dense CPU tensor|SparseCPU"),
    ],
)
def test_argument_checks(kwargs, message):
    """Refused with a message naming the argument, and the op serves on afterwards."""
    with pytest.raises(RuntimeError, match=message):
        _call(**kwargs)
    out = torch.empty(2, 16, dtype=BF16)
    _call(out=out)
    assert torch.equal(out, torch.full((2, 16), 8.0, dtype=BF16))


def test_pack_refuses_what_it_cannot_lay_out():
    with pytest.raises(ValueError, match="2-D bfloat16"):
        gemv.pack(torch.ones(4, 4))
    with pytest.raises(ValueError, match="2-D bfloat16"):
        gemv.pack(torch.ones(4, 4, 2, dtype=BF16))
