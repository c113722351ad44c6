"""The token-by-token C++ ops of a step's adapter deltas in half precision on the CPU
(kernels/csrc/lowrank_rows_cpu.cpp, through kernels/cpu_lowrank.py): against the float64
reference, each token's result independent of the rest of its batch, the dispatcher's choice,
and the refusals of bad arguments."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peftserve.kernels import add_lowrank_delta, build_segment_meta, cpu_ext
from peftserve.kernels.cpu_rows import bottleneck_delta_rows_cpu, lora_delta_rows_cpu
from tests.kernels.lowrank_cases import (
    assert_close,
    assert_untouched_rows,
    make_case,
    packed_bottlenecks,
    packed_loras,
    reference_y,
)

SMOLLM2_QKV = (576, 192, 192)
# One rounding of y + delta (fp32 sums; the weights hold the scale rounded to the dtype): within
# about an ulp of the float64 reference; the torch forms round twice more (BF16_TOL: 6e-2, 3e-2).
ROWS_TOL = {torch.bfloat16: (1.6e-2, 8e-3), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"


@pytest.mark.parametrize(("layout", "seg_len"), [("decode", 1), ("random", 1), ("prefill", 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_rows_match_reference(layout, seg_len, dtype):
    """Mixed ranks up to 16 on q,k,v (slot 1 has rank 0 on q), an empty slot, idle tokens whose
    x rows are NaN (never read), tokens shuffled against slot order; the dispatcher takes the
    same op."""
    n_tokens = 24 if layout == "decode" else 120
    case = make_case(
        n_tokens=n_tokens, d_in=576, slice_sizes=SMOLLM2_QKV, n_slots=32, max_rank=16,
        dtype=dtype, layout=layout, seg_len=seg_len,
    )  # fmt: skip
    assert not case.meta.in_order
    packed = packed_loras(case)
    y = case.y.clone()
    lora_delta_rows_cpu(y, case.x, packed, case.meta)
    assert_close(y, reference_y(case), *ROWS_TOL[dtype])
    assert_untouched_rows(y, case.y, case.token_slot)
    y2 = case.y.clone()
    add_lowrank_delta(y2, case.x, case.A, case.B, case.rank, case.scale, case.meta,
                      case.slice_sizes, packed=packed, native=True)  # fmt: skip
    assert torch.equal(y2, y)


def test_lora_rows_of_a_token_do_not_depend_on_its_batch():
    """Each token alone (a one-token step) gives bit for bit what it gets among 60 others of
    many slots, several of them sharing its slot, in or out of slot order."""
    case = make_case(n_tokens=60, d_in=64, slice_sizes=(32, 16, 16), n_slots=6, max_rank=8,
                     dtype=torch.bfloat16)  # fmt: skip
    packed = packed_loras(case)
    full = case.y.clone()
    lora_delta_rows_cpu(full, case.x, packed, case.meta)
    active = (case.token_slot >= 0).nonzero().flatten().tolist()
    assert len(active) > 30
    for t in active:
        one = case.y[t : t + 1].clone()
        meta = build_segment_meta(case.token_slot[t : t + 1])
        lora_delta_rows_cpu(one, case.x[t : t + 1], packed, meta)
        assert torch.equal(one[0], full[t]), t
    order = torch.argsort(case.token_slot, stable=True)  # the same tokens grouped by slot
    grouped = case.y[order].clone()
    meta = build_segment_meta(case.token_slot[order])
    lora_delta_rows_cpu(grouped, case.x[order], packed, meta)
    assert torch.equal(grouped, full[order])


def test_lora_rows_in_place_equal_gather_scatter_bitwise():
    case = make_case(n_tokens=12, d_in=64, slice_sizes=(32, 16, 16), n_slots=4, max_rank=8,
                     dtype=torch.bfloat16)  # fmt: skip
    meta = build_segment_meta(torch.tensor([0] * 5 + [1] * 3 + [2] * 4))
    assert meta.in_order
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    packed = packed_loras(case)
    y1, y2 = case.y.clone(), case.y.clone()
    lora_delta_rows_cpu(y1, x, packed, meta)
    lora_delta_rows_cpu(y2, x, packed, dataclasses.replace(meta, in_order=False))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, case.y)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize(("layout", "seg_len"), [("random", 1), ("prefill", 40)])
def test_bottleneck_rows_match_reference(act, layout, seg_len):
    """Each token reads its own row of the sub-layer output before its update (x = y)."""
    case = make_case(
        n_tokens=90, d_in=576, slice_sizes=(576,), n_slots=7, max_rank=36, dtype=torch.bfloat16,
        bottleneck=act, layout=layout, seg_len=seg_len,
    )  # fmt: skip
    case = dataclasses.replace(case, x=case.y.clone())
    y = case.y.clone()
    bottleneck_delta_rows_cpu(y, packed_bottlenecks(case), case.meta)
    assert_close(y, reference_y(case), *ROWS_TOL[torch.bfloat16])
    assert_untouched_rows(y, case.y, case.token_slot)


def test_bottleneck_rows_in_place_equal_gather_scatter_bitwise():
    case = make_case(n_tokens=12, d_in=64, slice_sizes=(64,), n_slots=4, max_rank=8,
                     dtype=torch.bfloat16, bottleneck="silu")  # fmt: skip
    meta = build_segment_meta(torch.tensor([0] * 5 + [1] * 3 + [2] * 4))
    packed = packed_bottlenecks(case)
    y1, y2 = case.y.clone(), case.y.clone()
    bottleneck_delta_rows_cpu(y1, packed, meta)
    bottleneck_delta_rows_cpu(y2, packed, dataclasses.replace(meta, in_order=False))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, case.y)


def test_without_the_kernels_the_dispatcher_keeps_the_torch_forms():
    case = make_case(n_tokens=24, d_in=576, slice_sizes=SMOLLM2_QKV, n_slots=32, max_rank=16,
                     dtype=torch.bfloat16, layout="decode", garbage=1e4)  # fmt: skip
    packed = packed_loras(case)
    y, rows = case.y.clone(), case.y.clone()
    add_lowrank_delta(y, case.x, case.A, case.B, case.rank, case.scale, case.meta,
                      case.slice_sizes, packed=packed)  # fmt: skip
    assert_close(y, reference_y(case), 6e-2, 3e-2)
    add_lowrank_delta(rows, case.x, case.A, case.B, case.rank, case.scale, case.meta,
                      case.slice_sizes, packed=packed, native=True)  # fmt: skip
    assert not torch.equal(y, rows)  # the torch forms round twice: not the C++ op's numbers


def _small_args():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 24, generator=g).bfloat16()
    x = torch.randn(4, 16, generator=g).bfloat16()
    A = torch.randn(5, 16, generator=g).bfloat16()
    B_t = torch.randn(5, 24, generator=g).bfloat16()
    return y, x, A, B_t


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "y": a["y"].float(), "x": a["x"].float()}, "half precision only"),
        (lambda a: {**a, "A": [a["A"][0][:4]]}, "A must be"),
        (lambda a: {**a, "B_blocks": [a["B_blocks"][0][:50]]}, "B_blocks must be"),
        (lambda a: {**a, "ranks": [3, 3]}, "A must be"),
        (lambda a: {**a, "bounds": [0, 9]}, "outside"),
        (lambda a: {**a, "rows": torch.tensor([0, 1, 7, 2])}, "outside"),
        (lambda a: {**a, "offsets": [0, 12, 20]}, "offsets"),
        (lambda a: {**a, "bounds": [0, 2, 2, 4]}, "per segment"),
    ],
)
def test_lora_rows_refuse_bad_arguments(change, message):
    y, x, A, B_t = _small_args()
    blocks = torch.cat([B_t[:3, :12].reshape(-1), B_t[3:, 12:].reshape(-1)])  # [3, 12], [2, 12]
    args = {"y": y, "x": x, "rows": None, "bounds": [0, 4], "A": [A], "B_blocks": [blocks],
            "ranks": [3, 2], "offsets": [0, 12, 24]}  # fmt: skip
    torch.ops.peftserve_cpu.lora_rows(**args)  # the unchanged arguments are fine
    with pytest.raises(RuntimeError, match=message):
        torch.ops.peftserve_cpu.lora_rows(**change(args))


def test_bottleneck_rows_refuse_bad_arguments():
    y, _, A, B_t = _small_args()
    y = y[:, :16].contiguous()
    B_t = B_t[:, :16].contiguous()
    zeros = torch.zeros(16).bfloat16()
    args = {"y": y, "rows": None, "bounds": [0, 4], "A": [A], "b_down": [zeros[:5]],
            "B_t": [B_t], "b_up": [zeros], "scales": [1.0], "act": 2}  # fmt: skip
    torch.ops.peftserve_cpu.bottleneck_rows(**args)
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.peftserve_cpu.bottleneck_rows(**{**args, "act": 7})
    with pytest.raises(RuntimeError, match="b_up must be"):
        torch.ops.peftserve_cpu.bottleneck_rows(**{**args, "b_up": [torch.zeros(15).bfloat16()]})
    with pytest.raises(RuntimeError, match="per segment"):
        torch.ops.peftserve_cpu.bottleneck_rows(**{**args, "scales": [1.0, 2.0]})
