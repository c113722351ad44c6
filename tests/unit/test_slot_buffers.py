"""DeviceSlots' stacked buffers on the CPU: zero storage that is never written to in full, and a
slot rewritten with a smaller rank keeps nothing of the earlier adapter past that rank."""

from __future__ import annotations

import torch

from peftserve.adapters.lora import LoraModule, LoraWeights
from peftserve.adapters.slots import DeviceSlots
from peftserve.kernels import cpu_ext
from peftserve.layers.backend import CpuBackend
from peftserve.models.llama import ModelShape

CPU = torch.device("cpu")

SHAPE = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                   vocab=100, max_positions=128)  # fmt: skip


def lora(r: int, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)

    def mod(d_in: int, d_out: int, scale: float) -> LoraModule:
        a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        return LoraModule(a, b, scale)

    return LoraWeights({(1, "v"): mod(64, 32, 2.0), (1, "down"): mod(128, 64, 0.5)})


def test_new_buffers_are_zero_and_a_smaller_rank_leaves_zeros_past_it():
    slots = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16,
                        device=CPU, backend=CpuBackend(native=cpu_ext.load()))  # fmt: skip
    slots.write_lora(2, lora(12, seed=0))
    qkv, down = slots.lora[(1, "qkv")], slots.lora[(1, "down")]
    for buf in (qkv, down):  # fresh storage: only slot 2's written rows are non-zero
        others = [s for s in range(4) if s != 2]
        assert not buf.A[:, others].any() and not buf.B[others].any()
        assert not buf.A[:, 2, :, :].float().isnan().any()
    assert not qkv.A[0, 2].any() and not qkv.A[1, 2].any()  # q, k: not in the adapter
    assert qkv.A[2, 2, :12].any() and not qkv.A[2, 2, 12:].any()

    slots.write_lora(2, lora(5, seed=1))  # the same slot, a smaller rank
    new = lora(5, seed=1).modules
    assert torch.equal(qkv.A[2, 2, :5], new[(1, "v")].A.bfloat16())
    assert not qkv.A[2, 2, 5:].any()
    assert not qkv.B[2, 96:128, 5:].any()  # v's output rows, past rank 5
    assert torch.equal(qkv.B[2, 96:128, :5], new[(1, "v")].B.bfloat16())
    assert not down.A[0, 2, 5:].any() and not down.B[2, :, 5:].any()
    assert int(qkv.rank[2, 2]) == 5 and int(down.rank[0, 2]) == 5


def test_decode_plan_is_reused_only_until_a_slot_is_written():
    """The hook's DecodePlan (the one-call decode stack's adapter arguments) is cached across
    steps with the same segments; rewriting a slot the step uses, with the same segments,
    must give a plan of the new weights."""
    from peftserve.adapters.slots import AdapterHook
    from peftserve.kernels import build_segment_meta

    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    slots = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16,
                        device=CPU, backend=CpuBackend(native=cpu_ext.load()))  # fmt: skip
    slots.write_lora(1, lora(8, seed=0))
    meta = build_segment_meta(torch.tensor([1, -1, 1]))
    plan = AdapterHook(slots, meta, ()).decode_plan(SHAPE.layers)
    again = AdapterHook(slots, meta, ()).decode_plan(SHAPE.layers)  # the next step: reused
    assert again.tensors is plan.tensors and slots.plans_built == 1
    assert any(t is slots.packed[(1, "qkv")][1].A for t in plan.tensors)
    slots.write_lora(1, lora(8, seed=1))  # same slot, same rank, other weights
    new = AdapterHook(slots, meta, ()).decode_plan(SHAPE.layers)
    assert new.tensors is not plan.tensors and slots.plans_built == 2
    assert any(t is slots.packed[(1, "qkv")][1].A for t in new.tensors)
    assert not any(t is slots.packed[(1, "qkv")][1].A for t in plan.tensors)
    same_segments = AdapterHook(slots, build_segment_meta(torch.tensor([1, 1, -1])), ())
    reused = same_segments.decode_plan(SHAPE.layers)  # rows come apart from the plan
    assert reused.tensors is new.tensors and slots.plans_built == 2
    assert torch.equal(reused.sorted_tokens, torch.tensor([0, 1]))  # this step's rows
    other = AdapterHook(slots, build_segment_meta(torch.tensor([1, 1, 1])), ())
    assert other.decode_plan(SHAPE.layers).tensors is not new.tensors  # other segments
    assert slots.plans_built == 3
