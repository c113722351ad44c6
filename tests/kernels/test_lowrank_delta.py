"""add_lowrank_delta (shrink then expand, y in place) against reference.lowrank_delta_reference:
the CPU path in both of its layouts at SmolLM2-135M sizes, the two Triton kernels chained."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peftserve.kernels import add_lowrank_delta, build_segment_meta
from peftserve.kernels.cpu_lowrank import lowrank_delta_cpu
from peftserve.kernels.cpu_packed import (
    bottleneck_delta_packed_cpu,
    lora_delta_packed_cpu,
    pack_lora,
)
from peftserve.kernels.triton_expand import expand_triton
from peftserve.kernels.triton_shrink import shrink_triton
from tests.kernels.lowrank_cases import (
    BF16_TOL,
    FP16_TOL,
    FP32_TOL,
    KERNEL_DEVICE,
    TF32_TOL,
    assert_close,
    assert_untouched_rows,
    make_case,
    packed_bottlenecks,
    reference_y,
    requires_cuda,
)

SMOLLM2_QKV = (576, 192, 192)  # q, k, v output widths; hidden 576


@pytest.mark.parametrize(
    ("n_tokens", "layout", "seg_len"), [(32, "decode", 1), (300, "prefill", 60)]
)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [FP32_TOL, BF16_TOL])
@pytest.mark.parametrize("bottleneck", [None, "silu"])
def test_cpu_layouts_match_reference(n_tokens, layout, seg_len, dtype, atol, rtol, bottleneck):
    """Both CPU layouts on the same case, and the dispatcher, whichever layout it picks."""
    case = make_case(
        n_tokens=n_tokens,
        d_in=576,
        slice_sizes=SMOLLM2_QKV,
        n_slots=40,
        max_rank=64,
        dtype=dtype,
        bottleneck=bottleneck,
        layout=layout,
        seg_len=seg_len,
        garbage=1e4,  # the padded layout multiplies storage past the rank by zero: finite only
    )
    expected = reference_y(case)
    for padded in (False, True):
        y = case.y.clone()
        lowrank_delta_cpu(
            y, case.x, case.A, case.B, case.rank, case.scale, case.meta, case.slice_sizes,
            case.b_down, case.b_up, case.act, padded=padded,
        )  # fmt: skip
        assert_close(y, expected, atol, rtol)
        assert_untouched_rows(y, case.y, case.token_slot)
    y = case.y.clone()
    out = add_lowrank_delta(
        y, case.x, case.A, case.B, case.rank, case.scale, case.meta, case.slice_sizes,
        **case.bias_kwargs,
    )  # fmt: skip
    assert out is y
    assert_close(y, expected, atol, rtol)


def test_cpu_all_ranks_zero_leaves_y_alone():
    case = make_case(n_tokens=12, d_in=33, slice_sizes=(16, 8), n_slots=13, max_rank=4)
    rank = torch.zeros_like(case.rank)
    for padded in (False, True):
        y = case.y.clone()
        lowrank_delta_cpu(
            y, case.x, case.A, case.B, rank, case.scale, case.meta, case.slice_sizes,
            None, None, None, padded=padded,
        )  # fmt: skip
        assert torch.equal(y, case.y)


def test_base_only_batch_returns_y_untouched():
    case = make_case(n_tokens=8, d_in=33, slice_sizes=(16,), n_slots=3, max_rank=4)
    meta = build_segment_meta(torch.full((8,), -1))
    y = case.y.clone()
    out = add_lowrank_delta(y, case.x, case.A, case.B, case.rank, case.scale, meta, (16,))
    assert out is y and torch.equal(y, case.y)


@pytest.mark.parametrize("max_rank", [1, 16, 128])
@pytest.mark.parametrize("bottleneck", [None, "gelu"])
# bf16 only on a GPU (test_gpu_*): the interpreter's bf16 tl.dot returns garbage.
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [FP32_TOL, FP16_TOL])
def test_triton_shrink_then_expand_matches_reference(max_rank, bottleneck, dtype, atol, rtol):
    """The v the shrink kernel writes is what the expand kernel expects."""
    case = make_case(
        n_tokens=27,
        d_in=73,
        slice_sizes=(48, 16, 16),
        n_slots=7,
        max_rank=max_rank,
        dtype=dtype,
        device=KERNEL_DEVICE,
        bottleneck=bottleneck,
    )
    v = shrink_triton(case.x, case.A, case.rank, case.meta, b_down=case.b_down, act=case.act)
    y = case.y.clone()
    expand_triton(y, v, case.B, case.rank, case.scale, case.meta, case.slice_sizes, b_up=case.b_up)
    assert_close(y, reference_y(case), atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("dtype", "atol", "rtol", "tf32"), [
    (*FP32_TOL, False), (*TF32_TOL, True), (*FP16_TOL, False), (*BF16_TOL, False),
])  # fmt: skip
@pytest.mark.parametrize(("n_tokens", "layout"), [(32, "decode"), (300, "prefill")])
@pytest.mark.parametrize("bottleneck", [None, "gelu"])
def test_gpu_dispatch_matches_reference(
    dtype, atol, rtol, tf32, n_tokens, layout, bottleneck, monkeypatch
):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    case = make_case(
        n_tokens=n_tokens,
        d_in=576,
        slice_sizes=SMOLLM2_QKV,
        n_slots=40,
        max_rank=64,
        dtype=dtype,
        device="cuda",
        bottleneck=bottleneck,
        layout=layout,
        seg_len=60,
    )
    y = case.y.clone()
    add_lowrank_delta(
        y, case.x, case.A, case.B, case.rank, case.scale, case.meta, case.slice_sizes,
        **case.bias_kwargs,
    )  # fmt: skip
    assert_close(y, reference_y(case), atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)


@pytest.mark.parametrize(("layout", "seg_len"), [("random", 1), ("prefill", 40)])
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [FP32_TOL, BF16_TOL])
def test_cpu_packed_lora_matches_reference(layout, seg_len, dtype, atol, rtol):
    """The packed by-segment path (A rows at exact ranks, B block-diagonal with the scales
    folded in) on mixed ranks, a slice of rank 0 (slot 1), an empty slot and idle tokens."""
    case = make_case(
        n_tokens=120, d_in=576, slice_sizes=SMOLLM2_QKV, n_slots=9, max_rank=16, dtype=dtype,
        layout=layout, seg_len=seg_len, garbage=1e4,  # finite: the dispatcher may pick padded
    )  # fmt: skip
    packed = [pack_lora(case.A, case.B, case.rank, case.scale, s, case.slice_sizes)
              for s in range(case.A.shape[1])]
    assert packed[1].A.shape[0] == int(case.rank[:, 1].sum())  # exact ranks, nothing padded
    expected = reference_y(case)
    y = case.y.clone()
    lora_delta_packed_cpu(y, case.x, packed, case.meta)
    assert_close(y, expected, atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)
    y = case.y.clone()  # the dispatcher, whichever layout it picks
    add_lowrank_delta(y, case.x, case.A, case.B, case.rank, case.scale, case.meta,
                      case.slice_sizes, packed=packed)
    assert_close(y, expected, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_packed_rows_in_place_equal_gather_scatter_bitwise(dtype):
    """Tokens already grouped by slot are updated in place; the result is bit-for-bit the one
    the gather/scatter form gives, so a request's output does not depend on that."""
    case = make_case(n_tokens=12, d_in=64, slice_sizes=(32, 16, 16), n_slots=4, max_rank=8,
                     dtype=dtype)
    token_slot = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    meta = build_segment_meta(token_slot)
    assert meta.in_order
    assert not build_segment_meta(torch.tensor([1, 0, 0])).in_order
    assert not build_segment_meta(torch.tensor([0, -1, 1])).in_order
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed = [pack_lora(case.A, case.B, case.rank, case.scale, s, case.slice_sizes)
              for s in range(4)]
    y1, y2 = case.y.clone(), case.y.clone()
    lora_delta_packed_cpu(y1, x, packed, meta)
    lora_delta_packed_cpu(y2, x, packed, dataclasses.replace(meta, in_order=False))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, case.y)


def test_pack_lora_of_a_slot_without_update_is_none():
    case = make_case(n_tokens=4, d_in=16, slice_sizes=(8, 8), n_slots=3, max_rank=4)
    rank = case.rank.clone()
    rank[:, 2] = 0
    assert pack_lora(case.A, case.B, rank, case.scale, 2, case.slice_sizes) is None


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [BF16_TOL, FP16_TOL])
def test_cpu_packed_lora_on_decode_is_the_dispatchers_form_without_a_compiler(dtype, atol, rtol):
    """A decode step (one token per slot, shuffled, some idle tokens) in half precision without
    the C++ kernels: the dispatcher runs the packed form segment by segment, bit for bit what
    lora_delta_packed_cpu gives, and within bf16/fp16 tolerance of the reference."""
    case = make_case(
        n_tokens=24, d_in=576, slice_sizes=SMOLLM2_QKV, n_slots=32, max_rank=16, dtype=dtype,
        layout="decode", garbage=1e4,
    )  # fmt: skip
    packed = [pack_lora(case.A, case.B, case.rank, case.scale, s, case.slice_sizes)
              for s in range(case.A.shape[1])]  # fmt: skip
    y = case.y.clone()
    lora_delta_packed_cpu(y, case.x, packed, case.meta)
    assert_close(y, reference_y(case), atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)
    y2 = case.y.clone()
    add_lowrank_delta(y2, case.x, case.A, case.B, case.rank, case.scale, case.meta,
                      case.slice_sizes, packed=packed)
    assert torch.equal(y2, y)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [FP32_TOL, BF16_TOL])
def test_cpu_layout_counts_only_segments_with_weights_on_the_module(dtype, atol, rtol):
    """The step's meta spans every adapter in the batch; a module that only one of them adapts
    (a LoRA on q,v next to bottleneck adapters, say) runs by segment over that one instead of
    padded over all of them (which cost a mixed-kinds step ~34 ms of padded expands)."""
    import peftserve.kernels.cpu_lowrank as cpu_lowrank

    case = make_case(n_tokens=12, d_in=64, slice_sizes=(32, 16, 16), n_slots=16, max_rank=8,
                     dtype=dtype, layout="decode", garbage=1e4)  # fmt: skip
    assert case.meta.num_segments >= 3 and cpu_lowrank.use_padded_layout(case.meta)
    assert cpu_lowrank.lowrank_layout(case.rank, case.meta) == "padded"
    case.rank[:, 1:] = 0  # only slot 0 has weights on this module
    expected = reference_y(case)
    assert cpu_lowrank.lowrank_layout(case.rank, case.meta) == "segments"
    packed = [pack_lora(case.A, case.B, case.rank, case.scale, s, case.slice_sizes)
              for s in range(case.A.shape[1])]  # fmt: skip
    for kw in ({}, {"packed": packed}):
        y = case.y.clone()
        add_lowrank_delta(y, case.x, case.A, case.B, case.rank, case.scale, case.meta,
                          case.slice_sizes, **kw)  # fmt: skip
        assert_close(y, expected, atol, rtol)
        assert_untouched_rows(y, case.y, case.token_slot)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize(("layout", "seg_len"), [("random", 1), ("prefill", 40)])
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [FP32_TOL, BF16_TOL])
def test_cpu_packed_bottleneck_matches_reference(act, layout, seg_len, dtype, atol, rtol):
    """The by-segment bottleneck on packed exact-rank weights, reading the sub-layer output it
    updates (x = y): each token's own slot, idle tokens untouched."""
    case = make_case(
        n_tokens=90, d_in=576, slice_sizes=(576,), n_slots=7, max_rank=36, dtype=dtype,
        bottleneck=act, layout=layout, seg_len=seg_len,
    )  # fmt: skip
    case = dataclasses.replace(case, x=case.y.clone())
    expected = reference_y(case)
    y = case.y.clone()
    bottleneck_delta_packed_cpu(y, packed_bottlenecks(case), case.meta)
    assert_close(y, expected, atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)


def test_cpu_packed_bottleneck_rows_in_place_equal_gather_scatter_bitwise():
    case = make_case(n_tokens=12, d_in=64, slice_sizes=(64,), n_slots=4, max_rank=8,
                     dtype=torch.bfloat16, bottleneck="silu")  # fmt: skip
    meta = build_segment_meta(torch.tensor([0] * 5 + [1] * 3 + [2] * 4))
    assert meta.in_order
    packed = packed_bottlenecks(case)
    y1, y2 = case.y.clone(), case.y.clone()
    bottleneck_delta_packed_cpu(y1, packed, meta)
    bottleneck_delta_packed_cpu(y2, packed, dataclasses.replace(meta, in_order=False))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, case.y)
