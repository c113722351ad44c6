"""lora_shrink: the Triton kernel (interpreted when there is no GPU) and the CPU path against
reference.shrink_reference."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels import lora_shrink
from peftserve.kernels.cpu_lowrank import use_padded_layout
from peftserve.kernels.triton_shrink import shrink_triton
from tests.kernels.lowrank_cases import (
    BF16_TOL,
    FP16_TOL,
    FP32_TOL,
    KERNEL_DEVICE,
    TF32_TOL,
    assert_close,
    make_case,
    reference_v,
    requires_cuda,
)

GQA_SLICES = (48, 16, 16)  # q, k, v widths under grouped-query attention


@pytest.mark.parametrize("max_rank", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("d_in", [33, 73])
@pytest.mark.parametrize(
    ("n_tokens", "n_slots", "layout", "seg_len"),
    [
        (9, 12, "decode", 1),  # one token per slot
        (40, 6, "random", 1),  # several tokens per slot, unsorted
        (45, 3, "prefill", 20),  # segments longer than 16 rows: a wider BLOCK_M
    ],
)
@pytest.mark.parametrize("bottleneck", [None, "silu"])
def test_triton_matches_reference(max_rank, d_in, n_tokens, n_slots, layout, seg_len, bottleneck):
    dtype, atol, rtol = FP32_TOL
    case = make_case(
        n_tokens=n_tokens,
        d_in=d_in,
        slice_sizes=GQA_SLICES,
        n_slots=n_slots,
        max_rank=max_rank,
        dtype=dtype,
        device=KERNEL_DEVICE,
        bottleneck=bottleneck,
        layout=layout,
        seg_len=seg_len,
    )
    v = shrink_triton(case.x, case.A, case.rank, case.meta, b_down=case.b_down, act=case.act)
    assert v.shape == (3, n_tokens, max_rank + 5) and v.dtype == torch.float32
    assert_close(v, reference_v(case), atol, rtol)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_triton_bottleneck_activations(act):
    dtype, atol, rtol = FP32_TOL
    case = make_case(
        n_tokens=21,
        d_in=73,
        slice_sizes=(73,),
        n_slots=5,
        max_rank=16,
        dtype=dtype,
        device=KERNEL_DEVICE,
        bottleneck=act,
    )
    v = shrink_triton(case.x, case.A, case.rank, case.meta, b_down=case.b_down, act=act)
    assert_close(v, reference_v(case), atol, rtol)


def test_triton_chunks_segments_longer_than_a_tile():
    """One slot with 150 rows: three 64-row chunks, the last partly masked."""
    dtype, atol, rtol = FP32_TOL
    case = make_case(
        n_tokens=150,
        d_in=33,
        slice_sizes=(16,),
        n_slots=2,
        max_rank=7,
        device=KERNEL_DEVICE,
        layout="prefill",
        seg_len=150,
    )
    assert case.meta.max_seg_len > 64
    v = shrink_triton(case.x, case.A, case.rank, case.meta)
    assert_close(v, reference_v(case), atol, rtol)


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
    v = lora_shrink(case.x, case.A, case.rank, case.meta, b_down=case.b_down, act=case.act)
    assert v.dtype == torch.float32
    assert_close(v, reference_v(case), atol, rtol)


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
    v = lora_shrink(case.x, case.A, case.rank, case.meta, b_down=case.b_down, act=case.act)
    assert v.is_cuda
    assert_close(v, reference_v(case), atol, rtol)
