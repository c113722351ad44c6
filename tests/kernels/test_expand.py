"""lora_expand: the Triton kernel (interpreted when there is no GPU) and the CPU path against
reference.expand_reference, adding into y in place."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels import lora_expand
from peftserve.kernels.cpu_lowrank import use_padded_layout
from peftserve.kernels.reference import expand_reference
from peftserve.kernels.triton_expand import expand_triton
from tests.kernels.lowrank_cases import (
    BF16_TOL,
    FP16_TOL,
    FP32_TOL,
    KERNEL_DEVICE,
    TF32_TOL,
    LowRankCase,
    assert_close,
    assert_untouched_rows,
    make_case,
    reference_v,
    requires_cuda,
    with_garbage_past_rank,
)

GQA_SLICES = (48, 16, 16)  # q, k, v widths under grouped-query attention


def _expected(case: LowRankCase, v: torch.Tensor) -> torch.Tensor:
    return expand_reference(
        case.y.cpu(),
        v.cpu(),
        case.B.cpu(),
        case.rank.cpu(),
        case.scale.cpu(),
        case.token_slot,
        case.slice_sizes,
        b_up=None if case.b_up is None else case.b_up.cpu(),
    )


@pytest.mark.parametrize("max_rank", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("slice_sizes", [GQA_SLICES, (73,)])
@pytest.mark.parametrize(
    ("n_tokens", "n_slots", "layout", "seg_len"),
    [
        (9, 12, "decode", 1),  # one token per slot
        (40, 6, "random", 1),  # several tokens per slot, unsorted
        (45, 3, "prefill", 20),  # segments longer than 16 rows: a wider BLOCK_M
    ],
)
@pytest.mark.parametrize("bottleneck", [None, "relu"])
def test_triton_matches_reference(
    max_rank, slice_sizes, n_tokens, n_slots, layout, seg_len, bottleneck
):
    dtype, atol, rtol = FP32_TOL
    case = make_case(
        n_tokens=n_tokens,
        d_in=33,
        slice_sizes=slice_sizes,
        n_slots=n_slots,
        max_rank=max_rank,
        dtype=dtype,
        device=KERNEL_DEVICE,
        bottleneck=bottleneck,
        layout=layout,
        seg_len=seg_len,
    )
    v = reference_v(case)
    y = case.y.clone()
    out = expand_triton(
        y,
        with_garbage_past_rank(v, case, float("nan")).to(KERNEL_DEVICE),
        case.B,
        case.rank,
        case.scale,
        case.meta,
        slice_sizes,
        b_up=case.b_up,
    )
    assert out is y
    assert_close(y, _expected(case, v), atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)


def test_triton_wide_slices_take_several_column_tiles():
    """Slices wider than BLOCK_N, of different widths (a narrow slice's extra tiles exit)."""
    dtype, atol, rtol = FP32_TOL
    case = make_case(
        n_tokens=30,
        d_in=33,
        slice_sizes=(200, 33),
        n_slots=4,
        max_rank=40,
        device=KERNEL_DEVICE,
        layout="prefill",
        seg_len=30,
    )
    v = reference_v(case)
    y = case.y.clone()
    expand_triton(y, v.to(KERNEL_DEVICE), case.B, case.rank, case.scale, case.meta, (200, 33))
    assert_close(y, _expected(case, v), atol, rtol)


@pytest.mark.parametrize(
    ("n_tokens", "layout", "seg_len", "padded"),
    [(32, "decode", 1, True), (300, "prefill", 60, False)],
)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [FP32_TOL, BF16_TOL])
@pytest.mark.parametrize("bottleneck", [None, "gelu"])
def test_cpu_path_matches_reference(
    n_tokens, layout, seg_len, padded, dtype, atol, rtol, bottleneck
):
    """SmolLM2-135M q/k/v sizes, ranks mixed up to 64; decode takes the padded layout."""
    case = make_case(
        n_tokens=n_tokens,
        d_in=576,
        slice_sizes=(576, 192, 192),
        n_slots=40,
        max_rank=64,
        dtype=dtype,
        bottleneck=bottleneck,
        layout=layout,
        seg_len=seg_len,
        garbage=1e4,  # the padded layout multiplies storage past the rank by zero: finite only
    )
    assert use_padded_layout(case.meta) is padded
    v = reference_v(case)
    y = case.y.clone()
    lora_expand(
        y,
        with_garbage_past_rank(v, case, 1e4),
        case.B,
        case.rank,
        case.scale,
        case.meta,
        case.slice_sizes,
        b_up=case.b_up,
    )
    assert_close(y, _expected(case, v), atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("dtype", "atol", "rtol", "tf32"), [
    (*FP32_TOL, False), (*TF32_TOL, True), (*FP16_TOL, False), (*BF16_TOL, False),
])  # fmt: skip
@pytest.mark.parametrize("layout", ["decode", "prefill"])
def test_gpu_dispatch_matches_reference(dtype, atol, rtol, tf32, layout, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    case = make_case(
        n_tokens=32 if layout == "decode" else 300,
        d_in=576,
        slice_sizes=(576, 192, 192),
        n_slots=40,
        max_rank=64,
        dtype=dtype,
        device="cuda",
        bottleneck="gelu",
        layout=layout,
        seg_len=60,
    )
    v = reference_v(case)
    y = case.y.clone()
    lora_expand(
        y,
        with_garbage_past_rank(v, case, float("nan")).cuda(),
        case.B,
        case.rank,
        case.scale,
        case.meta,
        case.slice_sizes,
        b_up=case.b_up,
    )
    assert_close(y, _expected(case, v), atol, rtol)
    assert_untouched_rows(y, case.y, case.token_slot)
