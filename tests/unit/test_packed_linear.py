"""Base weights packed for oneDNN (kernels/packed_linear.py): the same results as F.linear, bit
for bit, at every batch size, and the layer that holds them (layers/linear.py
AdaptableLinear.pack)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from peftserve.kernels import packed_linear
from peftserve.layers.linear import AdaptableLinear


@pytest.fixture(autouse=True)
def _needs_bf16_packing():
    if not packed_linear.supported(torch.bfloat16):
        pytest.skip("this CPU's oneDNN has no bf16 matmul to pack for")


@pytest.mark.parametrize("out_f,in_f", [(960, 576), (576, 1536), (96, 64), (7, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_bit_for_bit(out_f, in_f, bias):
    g = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g).bfloat16()
    b = torch.randn(out_f, generator=g).bfloat16() if bias else None
    x = torch.randn(300, in_f, generator=g).bfloat16()
    wp = packed_linear.pack(w)
    assert wp.is_mkldnn and torch.equal(wp.to_dense(), w)
    full = packed_linear.linear(x, wp, b)
    assert torch.equal(full, F.linear(x, w, b))
    for m in (0, 1, 2, 7, 8, 31, 32, 33, 128):
        assert torch.equal(packed_linear.linear(x[:m], wp, b), F.linear(x[:m], w, b)), m
    for i in (0, 5, 299):  # a row alone (oneDNN's M=1 kernel): F.linear's result again
        assert torch.equal(packed_linear.linear(x[i : i + 1], wp, b), F.linear(x[i : i + 1], w, b))
    strided = torch.randn(16, in_f + 9, generator=g).bfloat16()[:, :in_f]
    assert torch.equal(packed_linear.linear(strided, wp, b), F.linear(strided, w, b))


def test_packing_is_for_cpu_half_precision_only():
    from peftserve.layers.backend import Backend, CpuBackend

    assert packed_linear.supported(torch.bfloat16)
    assert not packed_linear.supported(torch.float32)  # fp32: MKL, kept as F.linear
    assert CpuBackend(native=False).packs_weights(torch.bfloat16)
    assert not CpuBackend(native=False).packs_weights(torch.float32)
    assert not CpuBackend(native=False, packed_weights=False).packs_weights(torch.bfloat16)
    assert not Backend().packs_weights(torch.bfloat16)  # the reference: dense weights


def test_adaptable_linear_holds_the_packed_weight_and_applies_its_hook():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 32, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    x = torch.randn(5, 32, generator=g).bfloat16()
    dense = AdaptableLinear(0, "qkv", w.clone(), b.clone(), (32, 8, 8))
    lin = AdaptableLinear(0, "qkv", w.clone(), b.clone(), (32, 8, 8))
    lin.pack()
    assert lin.weight is None and lin.matmul_weight() is lin.packed  # no dense copy kept
    assert torch.equal(lin.dense_weight(), w)
    seen = []

    class Hook:
        def begin(self, layer, module, xin):
            seen.append(("begin", layer, module, xin.shape))

        def apply(self, layer, module, xin, y):
            seen.append((layer, module, xin.shape, y.shape))
            y.add_(1)

    assert torch.equal(lin(x, Hook()), dense(x) + 1)
    assert seen == [("begin", 0, "qkv", (5, 32)), (0, "qkv", (5, 32), (5, 48))]
