"""Greedy sampling's argmax on the CPU (kernels/csrc/fused_cpu.cpp argmax_rows): torch.argmax's
answer on every row, ties, NaN and all -inf rows included, and the sampler takes it."""

from __future__ import annotations

import pytest
import torch

from peftserve.engine import sampler
from peftserve.engine.sampling_params import SamplingParams
from peftserve.kernels import cpu_ext
from tests.backends import counted_cpu_backend


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 49152])
def test_argmax_rows_equal_torch_argmax(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, n, generator=g).to(dtype)
    if n > 1:
        x[1, :] = 0.5  # all tied: the first
        x[2, n // 2] = x[2].max() + 1
        x[2, n - 1] = x[2, n // 2]  # tied maxima: the first of them
        x[3, :] = float("-inf")
        x[4, n // 3] = float("nan")  # NaN wins, as in torch
        x[4, n - 1] = float("inf")
        x[5, n - 1] = float("nan")
        x[5, 0] = float("nan")  # the first NaN
        x[6, 0] = float("inf")
        x[7, :] = -0.0
        x[7, n - 1] = 0.0  # -0.0 == 0.0: the first
    got = torch.ops.peftserve_cpu.argmax_rows(x)
    assert got.dtype == torch.long
    assert torch.equal(got, x.argmax(dim=-1))


def test_argmax_rows_refuses_bad_input():
    with pytest.raises(RuntimeError, match="contiguous non-empty"):
        torch.ops.peftserve_cpu.argmax_rows(torch.zeros(3, 8)[:, ::2])
    with pytest.raises(RuntimeError, match="contiguous non-empty"):
        torch.ops.peftserve_cpu.argmax_rows(torch.zeros(8))


def test_greedy_sampling_takes_the_op():
    backend, calls = counted_cpu_backend()
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(max_new_tokens=1)] * 4
    tokens, _ = sampler.sample(logits, params, [[]] * 4, [None] * 4, backend)
    assert calls["argmax_rows"] == 1
    assert tokens == logits.argmax(dim=-1).tolist()
