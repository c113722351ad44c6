"""The screened LM head (kernels/screened_head.py, csrc/screened_head_cpu.cpp): each row's token
is the argmax of the full bf16 head's logits, as the engine's greedy sampler takes it
(argmax_rows: the lowest index on ties), at odd sizes, every row count 1..9 and more, on
near-ties built to sit inside the int8 screen's error, and on real SmolLM2-shaped rows; it
declines (None: the caller takes the full head) where its bound does not hold."""

from __future__ import annotations

import math

import pytest
import torch

from peftserve.kernels import cpu_ext, gemv, quant
from peftserve.kernels.screened_head import MAX_ROWS, ScreenedHead

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ops():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    return torch.ops.peftserve_cpu


def full_argmax(ops, head: ScreenedHead, x: torch.Tensor) -> torch.Tensor:
    return ops.argmax_rows(gemv.linear(x, head.packed, None).float())


def op_argmax(ops, head: ScreenedHead, x: torch.Tensor) -> torch.Tensor | None:
    """The op itself, at any row count (ScreenedHead.argmax serves up to MAX_ROWS)."""
    tokens = torch.empty(x.shape[0], dtype=torch.long)
    ok = ops.screened_argmax(tokens, x, head.screen, head.coef, head.packed, head.max_norm,
                             head.tiny)  # fmt: skip
    return tokens if ok else None


def rand(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(BF16)


# (V, K): a narrow last tile, an odd K, fewer rows than a tile, SmolLM2's hidden size
SHAPES = [(77, 33), (1000, 73), (20, 16), (3000, 576)]


@pytest.mark.parametrize("V,K", SHAPES)
def test_the_full_heads_argmax_at_every_row_count(ops, V, K):
    g = torch.Generator().manual_seed(V + K)
    w = rand(g, V, K, std=0.05)
    head = ScreenedHead(gemv.pack(w), w)
    for M in (1, 2, 3, 4, 5, 6, 7, 8, 9, 33):
        for scale in (1e-3, 1.0, 30.0):
            x = rand(g, M, K, std=scale)
            got = op_argmax(ops, head, x)
            assert got is not None
            if M <= MAX_ROWS:
                assert torch.equal(head.argmax(x), got)
            else:
                assert head.argmax(x) is None  # the full head serves these
            assert torch.equal(got, full_argmax(ops, head, x)), (M, scale)


def test_ties_and_near_ties_inside_the_screens_error(ops):
    """Rows equal to the best (a tie: the lowest index wins), one bf16 step from it, and the
    best in the narrow last tile: all within the int8 screen's error of each other, so only
    the bf16 pass can tell them apart."""
    g = torch.Generator().manual_seed(1)
    V, K = 1000, 64
    w = rand(g, V, K, std=0.05)
    x = rand(g, 4, K)
    target = x[0].float() / x[0].float().norm()
    w[900] = (target * 0.5).to(BF16)  # the best of row 0, in tile 28
    w[130] = w[900]  # tied with it, earlier: must win
    w[131] = (target * 0.5 * (1 + 2**-7)).to(BF16)  # one step larger in some columns
    w[998] = (target * 0.5).to(BF16)  # in the narrow last tile
    w[999] = (x[1].float() / x[1].float().norm() * 0.6).to(BF16)  # row 1's best, last tile
    head = ScreenedHead(gemv.pack(w), w)
    got = head.argmax(x)
    want = full_argmax(ops, head, x)
    assert got is not None and torch.equal(got, want)
    assert int(want[1]) == 999


def test_many_near_ties_on_smollm2_shape(ops):
    """Every vocabulary row a small perturbation of one direction: thousands of candidates
    within the screen's error, so the int8 logits' own argmax is wrong in most rows of x; the
    screened token is still the full head's in every one."""
    g = torch.Generator().manual_seed(2)
    V, K = 4096, 576
    base = torch.randn(K, generator=g)
    w = ((base + torch.randn(V, K, generator=g) * 1e-2) * 0.05).to(BF16)
    head = ScreenedHead(gemv.pack(w), w)
    x = (base[None] + torch.randn(16, K, generator=g) * 0.1).to(BF16)
    want = full_argmax(ops, head, x)
    int8_argmax = ops.argmax_rows(quant.linear(x, head.screen, None).float())
    assert (int8_argmax != want).sum() >= 8  # the screen alone would fail these
    got = op_argmax(ops, head, x)
    assert got is not None and torch.equal(got, want)


@pytest.mark.parametrize("V,K", SHAPES)
def test_the_bound_holds(ops, V, K):
    """|int8 logit - bf16 logit| within the bound the op screens with, for every row."""
    g = torch.Generator().manual_seed(5 + V)
    w = rand(g, V, K, std=0.05)
    head = ScreenedHead(gemv.pack(w), w)
    for scale in (1e-3, 1.0, 30.0):
        x = rand(g, 9, K, std=scale)
        a = quant.linear(x, head.screen, None).double()
        e = gemv.linear(x, head.packed, None).double()
        xn = x.double().norm(dim=1, keepdim=True)
        bound = xn * head.coef.double() * (1 + 2**-6) + a.abs() * 2**-6 + head.tiny
        assert ((a - e).abs() <= bound).all()


def test_declines_where_the_bound_does_not_hold(ops):
    g = torch.Generator().manual_seed(3)
    V, K = 100, 32
    w = rand(g, V, K, std=0.05)
    head = ScreenedHead(gemv.pack(w), w)
    for bad in (math.inf, -math.inf, math.nan, 3e38):
        x = rand(g, 2, K)
        x[1, 5] = bad
        assert head.argmax(x) is None, bad
    w_nan = w.clone()
    w_nan[7, 3] = math.nan
    nan_head = ScreenedHead(gemv.pack(w_nan), w_nan)
    assert nan_head.argmax(rand(g, 1, K)) is None
    # and then serves every valid x as before
    x = rand(g, 3, K)
    assert torch.equal(head.argmax(x), full_argmax(ops, head, x))


def test_zero_rows_and_zero_x(ops):
    w = torch.zeros(70, 16, dtype=BF16)
    head = ScreenedHead(gemv.pack(w), w)
    assert head.argmax(torch.zeros(2, 16, dtype=BF16)).tolist() == [0, 0]
    assert head.argmax(torch.zeros(0, 16, dtype=BF16)).numel() == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokens": torch.empty(3, dtype=torch.long)}, "tokens must be"),
        ({"tokens": torch.empty(2, dtype=torch.int32)}, "tokens must be"),
        ({"x": torch.zeros(2, 16, dtype=torch.float32)}, "x must be"),
        ({"x": torch.zeros(2, 32, dtype=BF16)[:, ::2]}, "x must be"),
        ({"coef": torch.zeros(69)}, "coef must be"),
        ({"coef": torch.zeros(70, dtype=torch.float64)}, "coef must be"),
        ({"head": torch.zeros(70, 9, 2, dtype=BF16)}, "head must be"),
        ({"head": torch.zeros(70, 8, 2, dtype=torch.float32)}, "head must be"),
        ({"screen": torch.zeros(69, 20, dtype=torch.int8)}, "screen must have"),
        ({"screen": torch.zeros(70, 19, dtype=torch.int8)}, "gemv_int8"),
    ],
)
def test_argument_checks(ops, change, message):
    g = torch.Generator().manual_seed(4)
    w = rand(g, 70, 16)
    head = ScreenedHead(gemv.pack(w), w)
    args = {"tokens": torch.empty(2, dtype=torch.long), "x": rand(g, 2, 16),
            "screen": head.screen, "coef": head.coef, "head": head.packed}  # fmt: skip
    with pytest.raises(RuntimeError, match=message):
        ops.screened_argmax(**{**args, **change}, max_norm=head.max_norm, tiny=head.tiny)
    ops.screened_argmax(**args, max_norm=head.max_norm, tiny=head.tiny)  # still serves
    assert torch.equal(args["tokens"], full_argmax(ops, head, args["x"]))
