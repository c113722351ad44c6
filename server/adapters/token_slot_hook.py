"""The DeltaHook of a graph-safe step: every adapted module's deltas read the per-token slot
index from a persistent buffer, with no per-step host metadata (no SegmentMeta).

Which (layer, module) buffers exist is fixed when the hook is built: a CUDA graph captured with
it replays correctly for any adapters in those slot buffers (they are written in place, never
reallocated). A module allocated later (the first adapter to target it) changes `layout_key`.
A hook may be limited to some modules (those the step's adapters have deltas on): a graph
captured with it skips every other module's kernels, which for the rows it serves add zeros.

With `overlap` (config.lora_overlap) a LoRA's delta runs in the backend's two halves: the first
from begin(), before the base matmul (Triton: the shrink, or with "delta" the shrink and the
expand into a delta of their own, on `stream` where one is given, CUDA: beside the matmul, both
captured in the same graph), the second in apply(), once the matmul's output is there and the
current stream has waited for the first (the expand into it, or with "delta" adding the delta).
"""

from __future__ import annotations

from typing import Any

import torch

from peftserve.adapters.slots import DeviceSlots, ModuleKey
from peftserve.layers.linear import DecodePlan


def layout_key(slots: DeviceSlots) -> tuple[int, int]:
    """Changes whenever a module's slot buffers are allocated (they are never freed)."""
    return len(slots.lora), len(slots.bottleneck)


class TokenSlotHook:
    def __init__(self, slots: DeviceSlots, token_slot: torch.Tensor,
                 modules: frozenset[ModuleKey] | None = None, overlap: str = "off",
                 stream: torch.cuda.Stream | None = None) -> None:  # fmt: skip
        # token_slot: [T] int64 slot of each row, -1 = none (a view of the step's buffer).
        # modules: the only modules whose deltas are applied (DeviceSlots.modules_of the rows'
        # slots); None: every allocated one.
        self.slots, self.token_slot = slots, token_slot
        # overlap: config.lora_overlap ("off", "shrink", "delta"): each LoRA's first half (its
        # shrink, or its whole delta) begun before the base matmul, on `stream` where given
        self.overlap, self.stream = overlap, stream
        self._begun: dict[tuple[int, str], Any] = {}  # begin()'s halves, for apply()
        self.lora = {key for key in slots.lora if modules is None or ("lora", *key) in modules}
        self.bottlenecks: dict[tuple[int, str], list[str]] = {}
        for layer, module, act in sorted(slots.bottleneck):
            if modules is None or ("bottleneck", layer, module, act) in modules:
                self.bottlenecks.setdefault((layer, module), []).append(act)

    def decode_plan(self, layers: int) -> DecodePlan | None:
        return None

    def begin(self, layer: int, module: str, x: torch.Tensor) -> None:
        if self.overlap != "off" and (layer, module) in self.lora:
            lora = self.slots.lora[(layer, module)]
            self._begun[(layer, module)] = self.slots.backend.lowrank_begin_tokens(
                x, lora.A, lora.B, lora.rank, lora.scale, self.token_slot, lora.slice_sizes,
                self.stream, whole=self.overlap == "delta",
            )  # fmt: skip

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (updated in place)
        slots, backend = self.slots, self.slots.backend
        if (layer, module) in self.lora:
            lora = slots.lora[(layer, module)]
            begun = self._begun.pop((layer, module), None)
            if begun is not None:
                backend.lowrank_end_tokens(y, begun, lora.B, lora.rank, lora.scale,
                                           self.token_slot, lora.slice_sizes, self.stream)
            else:
                backend.lowrank_delta_tokens(y, x, lora.A, lora.B, lora.rank, lora.scale,
                                             self.token_slot, lora.slice_sizes)  # fmt: skip
        for act in self.bottlenecks.get((layer, module), ()):
            bn = slots.bottleneck[(layer, module, act)]
            # Slots of other kinds (or activations) have rank 0 here and add nothing.
            backend.lowrank_delta_tokens(
                y, y.clone(), bn.A, bn.B, bn.rank, bn.scale, self.token_slot, bn.slice_sizes,
                b_down=bn.b_down, b_up=bn.b_up, act=act,
            )  # fmt: skip
