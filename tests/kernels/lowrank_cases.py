"""Cases for the kernel tests: stacked slot buffers, a token -> slot map, tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from peftserve.kernels import SegmentMeta, build_segment_meta
from peftserve.kernels.cpu_packed import pack_bottleneck, pack_lora
from peftserve.kernels.reference import lowrank_delta_reference, shrink_reference

HAS_CUDA = torch.cuda.is_available()
# Where the Triton kernels run: the GPU when there is one, else the CPU under the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
# The one allowed skip: GPU tests (also marked `gpu`) where there is no CUDA device.
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device (run bench/gpu.sh on a GPU machine)"
)

# (dtype, atol, rtol) against the float64 reference, outputs of order 1.
FP32_TOL = (torch.float32, 1e-4, 1e-4)
TF32_TOL = (torch.float32, 2e-2, 2e-2)  # GPU with torch's TF32 switch on
FP16_TOL = (torch.float16, 1e-2, 1e-2)
BF16_TOL = (torch.bfloat16, 6e-2, 3e-2)


@dataclass
class LowRankCase:
    """One batch of the op: stacked slot buffers, a token -> slot map and its metadata."""

    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out_total]
    A: torch.Tensor  # [n_slices, S, R_max, in]
    B: torch.Tensor  # [S, out_total, R_max]
    rank: torch.Tensor  # [n_slices, S] int32
    scale: torch.Tensor  # [n_slices, S] float32
    token_slot: torch.Tensor  # [T] int, -1 = no adapter
    slice_sizes: tuple[int, ...]
    b_down: torch.Tensor | None  # [S, R_max]
    b_up: torch.Tensor | None  # [S, out_total]
    act: str | None
    meta: SegmentMeta

    @property
    def bias_kwargs(self) -> dict:
        return {"b_down": self.b_down, "b_up": self.b_up, "act": self.act}


def make_case(
    *,
    n_tokens: int,
    d_in: int,
    slice_sizes: tuple[int, ...],
    n_slots: int,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    bottleneck: str | None = None,  # activation name: adds b_down / b_up; None = plain LoRA
    layout: str = "random",  # "random" slots, "decode" (one token per slot) or "prefill"
    seg_len: int = 1,  # prefill: tokens per run of one slot
    garbage: float = float("nan"),  # written past each slot's rank: must never be read
    seed: int = 0,
) -> LowRankCase:
    """Ranks mixed up to `max_rank` with R_max = max_rank + 5 (storage only); the last slot gets
    no tokens, slot 1 has rank 0 on slice 0, about a fifth of the tokens have slot -1 and their
    x rows are NaN (a kernel that reads them fails), as is weight storage past each rank."""
    g = torch.Generator().manual_seed(seed)
    n_slices, r_max = len(slice_sizes), max_rank + 5
    rank = torch.randint(1, max_rank + 1, (n_slices, n_slots), generator=g, dtype=torch.int32)
    rank[:, 0] = max_rank
    if n_slots > 1:
        rank[0, 1] = 0
    used_slots = max(1, n_slots - 1)  # the last slot stays empty
    # Slots 0 (full rank) and 1 (rank 0 on slice 0) always have tokens.
    if layout == "decode":
        if n_tokens > used_slots:
            raise ValueError("decode needs a slot per token")
        others = 2 + torch.randperm(used_slots - 2, generator=g)[: n_tokens - 2]
        token_slot = torch.cat([torch.tensor([0, 1])[:n_tokens], others])
        token_slot = token_slot[torch.randperm(n_tokens, generator=g)]
    elif layout == "prefill":
        runs = torch.randint(0, used_slots, (n_tokens // seg_len + 1,), generator=g)
        runs[:2] = torch.tensor([1, 0])[: runs.numel()] % used_slots
        token_slot = runs.repeat_interleave(seg_len)[:n_tokens]
    else:
        token_slot = torch.randint(0, used_slots, (n_tokens,), generator=g)
        token_slot[:2] = torch.tensor([1, 0])[:n_tokens] % used_slots
    token_slot[torch.rand(n_tokens, generator=g) < 0.2] = -1
    token_slot[2 + (n_tokens - 2) // 2] = -1

    A = torch.randn(n_slices, n_slots, r_max, d_in, generator=g) / d_in**0.5
    B = torch.randn(n_slots, sum(slice_sizes), r_max, generator=g) / max_rank**0.5
    for i in range(n_slices):
        for s in range(n_slots):
            A[i, s, rank[i, s] :] = garbage
    offsets = [0, *torch.tensor(slice_sizes).cumsum(0).tolist()]
    for i in range(n_slices):
        for s in range(n_slots):
            B[s, offsets[i] : offsets[i + 1], rank[i, s] :] = garbage
    x = torch.randn(n_tokens, d_in, generator=g)
    x[token_slot < 0] = float("nan")
    b_down = b_up = None
    if bottleneck is not None:
        b_down = torch.randn(n_slots, r_max, generator=g)
        b_up = torch.randn(n_slots, sum(slice_sizes), generator=g)
    return LowRankCase(
        x=x.to(device, dtype),
        y=torch.randn(n_tokens, sum(slice_sizes), generator=g).to(device, dtype),
        A=A.to(device, dtype),
        B=B.to(device, dtype),
        rank=rank.to(device),
        scale=(0.5 + torch.rand(n_slices, n_slots, generator=g)).to(device),
        token_slot=token_slot,
        slice_sizes=slice_sizes,
        b_down=None if b_down is None else b_down.to(device, dtype),
        b_up=None if b_up is None else b_up.to(device, dtype),
        act=bottleneck,
        meta=build_segment_meta(token_slot.to(device)),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), atol=atol, rtol=rtol)


def assert_untouched_rows(
    after: torch.Tensor, before: torch.Tensor, token_slot: torch.Tensor
) -> None:
    """Rows of tokens without an adapter are bit-for-bit what they were."""
    idle = (token_slot < 0).cpu()
    assert idle.any(), "the case must contain tokens without an adapter"
    assert torch.equal(after.cpu()[idle], before.cpu()[idle])


def reference_v(case: LowRankCase) -> torch.Tensor:  # [n_slices, T, R_max] float32, on CPU
    return shrink_reference(
        case.x.cpu(), case.A.cpu(), case.rank.cpu(), case.token_slot, **_cpu(case.b_down, case.act)
    )


def reference_y(case: LowRankCase) -> torch.Tensor:  # [T, out_total], on CPU
    """The whole op on case.y, v kept in float64."""
    return lowrank_delta_reference(
        case.y.cpu(),
        case.x.cpu(),
        case.A.cpu(),
        case.B.cpu(),
        case.rank.cpu(),
        case.scale.cpu(),
        case.token_slot,
        case.slice_sizes,
        b_down=None if case.b_down is None else case.b_down.cpu(),
        b_up=None if case.b_up is None else case.b_up.cpu(),
        act=case.act,
    )


def with_garbage_past_rank(v: torch.Tensor, case: LowRankCase, garbage: float) -> torch.Tensor:
    """v with `garbage` past each token's rank and in rows without an adapter: expand must read
    neither."""
    v = v.clone()
    for t, s in enumerate(case.token_slot.tolist()):
        for i in range(v.shape[0]):
            v[i, t, 0 if s < 0 else int(case.rank[i, s]) :] = garbage
    return v


def _cpu(b_down: torch.Tensor | None, act: str | None) -> dict:
    return {"b_down": None if b_down is None else b_down.cpu(), "act": act}


def packed_loras(case: LowRankCase) -> list:
    """Each slot's LoRA packed for the CPU paths (cpu_packed.pack_lora), None where empty."""
    return [pack_lora(case.A, case.B, case.rank, case.scale, s, case.slice_sizes)
            for s in range(case.A.shape[1])]  # fmt: skip


def packed_bottlenecks(case: LowRankCase) -> list:
    """Each slot's bottleneck packed for the CPU paths (cpu_packed.pack_bottleneck)."""
    return [
        None if int(case.rank[0, s]) == 0 else pack_bottleneck(
            case.A, case.b_down, case.B, case.b_up, float(case.scale[0, s]), s,
            int(case.rank[0, s]), case.act,
        )
        for s in range(case.A.shape[1])
    ]  # fmt: skip
