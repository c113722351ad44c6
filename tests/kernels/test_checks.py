"""Argument checks: every public op and Triton launcher rejects a bad layout with a ValueError
that names the problem, before any kernel runs."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch

from peftserve.kernels import (
    SegmentMeta,
    add_lowrank_delta,
    build_segment_meta,
    checks,
    lora_expand,
    lora_shrink,
)
from peftserve.kernels.checks import LowrankChecks, check_lowrank_args
from peftserve.kernels.triton_expand import expand_triton
from peftserve.kernels.triton_shrink import shrink_triton
from tests.kernels.lowrank_cases import KERNEL_DEVICE, LowRankCase, make_case


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


# On the device the Triton launchers run on (the GPU, or the CPU under the interpreter), so the
# unmutated arguments are accepted by every op.
def _meta(token_slot: list[int]) -> SegmentMeta:
    return build_segment_meta(torch.tensor(token_slot, device=KERNEL_DEVICE))


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, device=KERNEL_DEVICE)


def _case(device: str = KERNEL_DEVICE) -> LowRankCase:
    # 2 slices (24, 8), 4 slots, R_max 9, in 33, 10 tokens
    return make_case(
        n_tokens=10, d_in=33, slice_sizes=(24, 8), n_slots=4, max_rank=4, device=device
    )


SHRINK_ERRORS: list[tuple[str, Callable[[dict], None], str]] = [
    ("x 1-D", lambda a: a.update(x=a["x"][0]), r"x must be 2-D \[T, in\]"),
    ("x width", lambda a: a.update(x=a["x"][:, :32]), "A has in = 33"),
    ("x int", lambda a: a.update(x=a["x"].long()), "x must be float32, float16 or bfloat16"),
    ("A dtype", lambda a: a.update(A=a["A"].half()), "A must have the activations' dtype"),
    ("A 3-D", lambda a: a.update(A=a["A"][0]), r"A must be 4-D \[n_slices, S, R_max, in\]"),
    ("x strided", lambda a: a.update(x=_column_major(a["x"])), "x must be contiguous in its last"),
    ("rank int64", lambda a: a.update(rank=a["rank"].long()), "rank must be torch.int32"),
    ("rank shape", lambda a: a.update(rank=a["rank"][:, :3]), r"rank must be \[n_slices, S\]"),
    ("rank strided", lambda a: a.update(rank=_column_major(a["rank"])), "rank must be contiguous"),
    ("meta tokens", lambda a: a.update(meta=_meta([0] * 9)), "built for 9 tokens"),
    ("meta slot", lambda a: a.update(meta=_meta([4] * 10)), "only 4 slots"),
    ("meta type", lambda a: a.update(meta=[0] * 10), "meta must be a SegmentMeta"),
    ("b_down shape", lambda a: a.update(b_down=_zeros(4, 8)), r"b_down must be \[S, R_max\]"),
    ("b_down dtype", lambda a: a.update(b_down=_zeros(4, 9).double()), "b_down must have"),
    ("act", lambda a: a.update(act="tanh"), "unknown activation 'tanh'"),
]  # fmt: skip

EXPAND_ERRORS: list[tuple[str, Callable[[dict], None], str]] = [
    ("y width", lambda a: a.update(y=a["y"][:, :31]), "B has out_total = 32"),
    ("y strided", lambda a: a.update(y=_column_major(a["y"])), "y must be contiguous in its last"),
    ("B dtype", lambda a: a.update(B=a["B"].double()), "B must have the activations' dtype"),
    ("v dtype", lambda a: a.update(v=a["v"].half()), "v must be float32"),
    ("v shape", lambda a: a.update(v=a["v"][:, :9]), r"v must be \[n_slices, T, R_max\]"),
    ("slices sum", lambda a: a.update(slice_sizes=(24, 7)), "sum to 31, not out_total 32"),
    ("slices count", lambda a: a.update(slice_sizes=(32,)), "1 entries but there are 2 slices"),
    ("slices list", lambda a: a.update(slice_sizes=[24, 8]), "tuple of positive ints"),
    ("scale dtype", lambda a: a.update(scale=a["scale"].half()), "scale must be torch.float32"),
    ("b_up shape", lambda a: a.update(b_up=_zeros(4, 31)), r"b_up must be \[S, out_total\]"),
]  # fmt: skip


def _shrink_args(case: LowRankCase) -> dict:
    return {"x": case.x, "A": case.A, "rank": case.rank, "meta": case.meta, "b_down": None,
            "act": None}  # fmt: skip


def _expand_args(case: LowRankCase) -> dict:
    v = _zeros(2, 10, 9)
    return {"y": case.y, "v": v, "B": case.B, "rank": case.rank, "scale": case.scale,
            "meta": case.meta, "slice_sizes": case.slice_sizes, "b_up": None}  # fmt: skip


def _call_shrink(fn: Callable, a: dict) -> None:
    fn(a["x"], a["A"], a["rank"], a["meta"], b_down=a["b_down"], act=a["act"])


def _call_expand(fn: Callable, a: dict) -> None:
    fn(a["y"], a["v"], a["B"], a["rank"], a["scale"], a["meta"], a["slice_sizes"], b_up=a["b_up"])


@pytest.mark.parametrize("fn", [lora_shrink, shrink_triton], ids=["lora_shrink", "shrink_triton"])
@pytest.mark.parametrize(
    ("name", "mutate", "message"), SHRINK_ERRORS, ids=[e[0] for e in SHRINK_ERRORS]
)
def test_shrink_rejects(fn, name, mutate, message):
    args = _shrink_args(_case())
    _call_shrink(fn, dict(args))  # the unmutated arguments are accepted
    mutate(args)
    with pytest.raises(ValueError, match=message):
        _call_shrink(fn, args)


@pytest.mark.parametrize("fn", [lora_expand, expand_triton], ids=["lora_expand", "expand_triton"])
@pytest.mark.parametrize(
    ("name", "mutate", "message"), EXPAND_ERRORS, ids=[e[0] for e in EXPAND_ERRORS]
)
def test_expand_rejects(fn, name, mutate, message):
    args = _expand_args(_case())
    _call_expand(fn, dict(args))
    mutate(args)
    with pytest.raises(ValueError, match=message):
        _call_expand(fn, args)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(y=a["y"][:9]), "y has 9 rows but x has 10"),
        (lambda a: a.update(B=a["B"][:3]), "S and R_max must agree"),
        (lambda a: a.update(b_up=_zeros(4, 32).half()), "b_up must have"),
        (lambda a: a.update(act="swish"), "unknown activation"),
    ],
)
def test_add_lowrank_delta_rejects(mutate, message):
    case = _case()
    args = {"y": case.y.clone(), "x": case.x, "A": case.A, "B": case.B, "rank": case.rank,
            "scale": case.scale, "meta": case.meta, "slice_sizes": case.slice_sizes}  # fmt: skip
    add_lowrank_delta(**args)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        add_lowrank_delta(**args)


@pytest.mark.parametrize("bad_rank", [-1, 10])
def test_cpu_path_rejects_rank_outside_storage(bad_rank):
    case = _case("cpu")
    rank = case.rank.clone()
    rank[0, 0] = bad_rank  # R_max is 9
    with pytest.raises(ValueError, match="outside 0..R_max=9"):
        lora_shrink(case.x, case.A, rank, case.meta)


def test_rejects_tensors_on_other_devices():
    case = _case("cpu")
    with pytest.raises(ValueError, match="rank is on meta"):
        lora_shrink(case.x, case.A, case.rank.to("meta"), case.meta)


def _lowrank_args(case: LowRankCase) -> dict:
    return {"y": case.y, "x": case.x, "A": case.A, "B": case.B, "rank": case.rank,
            "scale": case.scale, "meta": case.meta, "slice_sizes": case.slice_sizes,
            "b_down": None, "b_up": None, "act": None}  # fmt: skip


def _as_strided_last_dims(t: torch.Tensor) -> None:
    """t's last two dims laid out column-major, in place: same object, same shape."""
    s = t.stride()
    t.as_strided_(t.shape, (*s[:-2], 1, t.shape[-2]))


# What a later call may change after LowrankChecks accepted the weights: the activations and
# meta, new weight tensors, the other arguments, and A or B's layout changed in place.
LOWRANK_ERRORS: list[tuple[str, Callable[[dict], None], str]] = [
    ("x width", lambda a: a.update(x=a["x"][:, :32]), "A has in = 33"),
    ("x 1-D", lambda a: a.update(x=a["x"][0]), r"x must be 2-D \[T, in\]"),
    ("x type", lambda a: a.update(x=a["x"].tolist()), "x must be a torch.Tensor"),
    ("x dtype", lambda a: a.update(x=a["x"].half()), "A must have the activations' dtype"),
    ("x int", lambda a: a.update(x=a["x"].long()), "x must be float32, float16 or bfloat16"),
    ("x strided", lambda a: a.update(x=_column_major(a["x"])), "x must be contiguous in its last"),
    ("x device", lambda a: a.update(x=a["x"].to("meta")), "tensors are on meta"),
    ("y rows", lambda a: a.update(y=a["y"][:9]), "y has 9 rows but x has 10"),
    ("y width", lambda a: a.update(y=a["y"][:, :31]), "B has out_total = 32"),
    ("y dtype", lambda a: a.update(y=a["y"].double()), "y must be float32, float16 or bfloat16"),
    ("y strided", lambda a: a.update(y=_column_major(a["y"])), "y must be contiguous in its last"),
    ("meta tokens", lambda a: a.update(meta=_meta([0] * 9)), "built for 9 tokens"),
    ("meta slot", lambda a: a.update(meta=_meta([4] * 10)), "only 4 slots"),
    ("meta type", lambda a: a.update(meta=[0] * 10), "meta must be a SegmentMeta"),
    ("B rows", lambda a: a.update(B=a["B"][:3]), "S and R_max must agree"),
    ("rank int64", lambda a: a.update(rank=a["rank"].long()), "rank must be torch.int32"),
    ("scale dtype", lambda a: a.update(scale=a["scale"].half()), "scale must be torch.float32"),
    ("slices sum", lambda a: a.update(slice_sizes=(24, 7)), "sum to 31, not out_total 32"),
    ("slices list", lambda a: a.update(slice_sizes=[24, 8]), "tuple of positive ints"),
    ("b_up", lambda a: a.update(b_up=_zeros(4, 31)), r"b_up must be \[S, out_total\]"),
    ("act", lambda a: a.update(act="tanh"), "unknown activation 'tanh'"),
    ("A in place", lambda a: _as_strided_last_dims(a["A"]), "A must be contiguous in its last"),
    ("B in place", lambda a: _as_strided_last_dims(a["B"]), "B must be contiguous in its last"),
    ("A resized", lambda a: a["A"].resize_(2, 4, 9, 32), "A has in = 32"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "mutate", "message"), LOWRANK_ERRORS, ids=[e[0] for e in LOWRANK_ERRORS]
)
def test_lowrank_checks_refuse_after_accepting(name, mutate, message):
    """Weights accepted once do not let a bad call through: each refusal is the full check's."""
    case = _case("cpu")
    case.A, case.B = case.A.clone(), case.B.clone()  # mutated in place by some cases
    args = _lowrank_args(case)
    check = LowrankChecks()
    check(**args)
    check(**args)  # accepted again, from what it remembers
    mutate(args)
    with pytest.raises(ValueError, match=message) as refused:
        check(**args)
    with pytest.raises(ValueError) as full:
        check_lowrank_args(**args)
    assert str(refused.value) == str(full.value)


def test_lowrank_checks_check_weights_once(monkeypatch):
    """The weights are checked at their first call only; new activations and meta each step
    are checked on their own, and an entry goes with its A."""
    case = _case()
    check = LowrankChecks()
    full: list[int] = []
    monkeypatch.setattr(
        checks, "check_lowrank_args", lambda *a: full.append(1) or check_lowrank_args(*a)
    )
    args = _lowrank_args(case)
    for step in range(3):  # each step's activations are new tensors
        args.update(x=case.x.clone(), y=case.y.clone(), meta=_meta([step % 4] * 10))
        check(**args)
    assert len(full) == 1
    args.update(scale=case.scale.clone())  # other weights: checked again
    check(**args)
    assert len(full) == 2
    other = _lowrank_args(_case())
    check(**other)
    assert len(full) == 3 and len(check._accepted) == 2
    del other, args, case
    gc.collect()
    assert not check._accepted  # both A tensors are gone
