"""The DeltaHook of a graph-safe step: every adapted module's deltas read the per-token slot
index from a persistent buffer, with no per-step host metadata (no SegmentMeta).

Which (layer, module) buffers exist is fixed when the hook is built: a CUDA graph captured with
it replays correctly for any adapters in those slot buffers (they are written in place, never
reallocated). A module allocated later (the first adapter to target it) changes `layout_key`.
"""

from __future__ import annotations

import torch

from peftserve.adapters.slots import DeviceSlots
from peftserve.layers.linear import DecodePlan


def layout_key(slots: DeviceSlots) -> tuple[int, int]:
    """Changes whenever a module's slot buffers are allocated (they are never freed)."""
    return len(slots.lora), len(slots.bottleneck)


class TokenSlotHook:
    def __init__(self, slots: DeviceSlots, token_slot: torch.Tensor) -> None:
        # token_slot: [T] int64 slot of each row, -1 = none (a view of the step's buffer)
        self.slots, self.token_slot = slots, token_slot
        self.bottlenecks: dict[tuple[int, str], list[str]] = {}
        for layer, module, act in sorted(slots.bottleneck):
            self.bottlenecks.setdefault((layer, module), []).append(act)

    def decode_plan(self, layers: int) -> DecodePlan | None:
        return None

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (updated in place)
        slots, backend = self.slots, self.slots.backend
        lora = slots.lora.get((layer, module))
        if lora is not None:
            backend.lowrank_delta_tokens(y, x, lora.A, lora.B, lora.rank, lora.scale,
                                         self.token_slot, lora.slice_sizes)  # fmt: skip
        for act in self.bottlenecks.get((layer, module), ()):
            bn = slots.bottleneck[(layer, module, act)]
            # Slots of other kinds (or activations) have rank 0 here and add nothing.
            backend.lowrank_delta_tokens(
                y, y.clone(), bn.A, bn.B, bn.rank, bn.scale, self.token_slot, bn.slice_sizes,
                b_down=bn.b_down, b_up=bn.b_up, act=act,
            )  # fmt: skip
