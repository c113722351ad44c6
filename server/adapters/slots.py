"""Device slot buffers: every resident LoRA / bottleneck adapter's weights stacked per module.

A slot index (not the adapter's id) picks an adapter's rows in each buffer. Kernels read each
slot's exact rank from `rank`; rank 0 means "no update here", so an adapter that targets only q,v
costs nothing on o/gate/up/down. Buffers are allocated on first use of a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from peftserve.adapters.bottleneck import BottleneckWeights
from peftserve.adapters.lora import LoraWeights, module_dims
from peftserve.kernels import SegmentMeta
from peftserve.kernels.activation import activation_code
from peftserve.kernels.cpu_packed import PackedBottleneck, PackedLora, pack_bottleneck, pack_lora
from peftserve.kernels.cpu_rows import bottleneck_rows_args, lora_rows_args
from peftserve.layers.backend import Backend
from peftserve.layers.linear import BOTTLENECK_ROWS, LORA_ROWS, DecodePlan
from peftserve.models.llama import ModelShape

# Fused base projections and the LoRA slices inside each, in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "o": ("o",),
    "gate_up": ("gate", "up"),
    "down": ("down",),
}
GROUP_OF = {proj: (group, i) for group, projs in GROUPS.items() for i, proj in enumerate(projs)}
# Bottleneck placements act on the output of these projections (before the residual add).
PLACEMENT_GROUP = {"mh_adapter": "o", "output_adapter": "down"}


@dataclass
class StackedModule:
    """One (layer, module) buffer set for all slots."""

    A: torch.Tensor  # [n_slices, S, R_max, in]
    B: torch.Tensor  # [S, out_total, R_max]
    rank: torch.Tensor  # [n_slices, S] int32
    scale: torch.Tensor  # [n_slices, S] float32
    slice_sizes: tuple[int, ...]
    b_down: torch.Tensor | None = None  # [S, R_max] (bottleneck)
    b_up: torch.Tensor | None = None  # [S, out_total] (bottleneck)
    # [n_slices][S]: rows of A (columns of B) past which a slot's storage is still all zero
    written: list[list[int]] = field(default_factory=list)

    def clear(self, slot: int) -> None:
        self.rank[:, slot] = 0


class DeviceSlots:
    def __init__(
        self,
        shape: ModelShape,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: Backend,
    ) -> None:  # fmt: skip
        self.shape, self.num_slots, self.max_rank = shape, num_slots, max_rank
        self.dtype, self.device, self.backend = dtype, device, backend
        # group -> (in_features, output slice sizes), from the table the LoRA loader checks against
        self._dims = {
            group: (module_dims(shape, projs[0])[0], tuple(module_dims(shape, p)[1] for p in projs))
            for group, projs in GROUPS.items()
        }
        self.lora: dict[tuple[int, str], StackedModule] = {}
        # CPU backend only: each slot's LoRA packed per module (cpu_packed.PackedLora), rebuilt
        # from the stacked buffers whenever a slot is written or cleared.
        self.packed: dict[tuple[int, str], list[PackedLora | None]] | None = (
            {} if backend.packs_adapters else None
        )
        # Bottlenecks are keyed by activation too: one kernel call applies one activation.
        self.bottleneck: dict[tuple[int, str, str], StackedModule] = {}
        # CPU backend only: each slot's bottleneck packed per placement (PackedBottleneck).
        self.packed_bottleneck: dict[tuple[int, str, str], list[PackedBottleneck | None]] | None = (
            {} if backend.packs_adapters else None
        )
        self.slot_activation: dict[int, str] = {}
        # Bumped by every write or clear: the last DecodePlan is reused while the step's
        # segments and this stay the same (consecutive decode steps of one batch).
        self.version = 0
        self._plan: tuple[tuple, DecodePlan] | None = None
        self.plans_built = 0  # DecodePlans built (the rest of the decode_plan() calls reused one)

    def _zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return self.backend.zeros(shape, dtype, self.device)

    def _new(self, d_in: int, sizes: tuple[int, ...], bias: bool) -> StackedModule:
        S, R, n, z = self.num_slots, self.max_rank, len(sizes), self._zeros
        # Zero-filled: the CPU path multiplies storage past a slot's rank by exact zeros.
        return StackedModule(
            A=z(n, S, R, d_in, dtype=self.dtype),
            B=z(S, sum(sizes), R, dtype=self.dtype),
            rank=z(n, S, dtype=torch.int32),
            scale=z(n, S, dtype=torch.float32),
            slice_sizes=sizes,
            b_down=z(S, R, dtype=self.dtype) if bias else None,
            b_up=z(S, sum(sizes), dtype=self.dtype) if bias else None,
            written=[[0] * S for _ in sizes],
        )

    def clear(self, slot: int) -> None:
        self.version += 1
        for m in (*self.lora.values(), *self.bottleneck.values()):
            m.clear(slot)
        if self.packed is not None:
            for per_slot in self.packed.values():
                per_slot[slot] = None
        if self.packed_bottleneck is not None:
            for per_slot_b in self.packed_bottleneck.values():
                per_slot_b[slot] = None
        self.slot_activation.pop(slot, None)

    def write_lora(self, slot: int, weights: LoraWeights) -> None:
        self.clear(slot)
        for (layer, proj), mod in weights.modules.items():
            group, i = GROUP_OF[proj]
            buf = self.lora.get((layer, group))
            if buf is None:
                d_in, sizes = self._dims[group]
                buf = self.lora[(layer, group)] = self._new(d_in, sizes, bias=False)
            r = mod.A.shape[0]
            off = sum(buf.slice_sizes[:i])
            rows = buf.B[slot, off : off + buf.slice_sizes[i]]
            # Rows past r must be zero: only those an earlier adapter wrote need zeroing (the
            # rest never left the zero pages, and writing zeros would fault them all in).
            hw = buf.written[i][slot]
            if hw > r:
                buf.A[i, slot, r:hw].zero_()
                rows[:, r:hw].zero_()
            buf.A[i, slot, :r] = mod.A.to(self.dtype)
            rows[:, :r] = mod.B.to(self.dtype)
            buf.written[i][slot] = r
            buf.rank[i, slot] = r
            buf.scale[i, slot] = mod.scale
        if self.packed is not None:
            for layer, group in {(layer, GROUP_OF[proj][0]) for layer, proj in weights.modules}:
                buf = self.lora[(layer, group)]
                per_slot = self.packed.get((layer, group))
                if per_slot is None:
                    per_slot = self.packed[(layer, group)] = [None] * self.num_slots
                per_slot[slot] = pack_lora(buf.A, buf.B, buf.rank, buf.scale, slot, buf.slice_sizes)
        self.version += 1

    def write_bottleneck(self, slot: int, weights: BottleneckWeights) -> None:
        self.clear(slot)
        act = weights.activation
        for (layer, placement), (wd, bd, wu, bu) in weights.modules.items():
            group = PLACEMENT_GROUP[placement]
            buf = self.bottleneck.get((layer, group, act))
            if buf is None:
                buf = self.bottleneck[(layer, group, act)] = self._new(
                    self.shape.hidden, (self.shape.hidden,), bias=True
                )
            assert buf.b_down is not None and buf.b_up is not None
            r = wd.shape[0]
            buf.A[0, slot].zero_()
            buf.A[0, slot, :r] = wd.to(self.dtype)
            buf.B[slot].zero_()
            buf.B[slot, :, :r] = wu.to(self.dtype)
            buf.b_down[slot].zero_()
            buf.b_down[slot, :r] = bd.to(self.dtype)
            buf.b_up[slot] = bu.to(self.dtype)
            buf.rank[0, slot] = r
            buf.scale[0, slot] = weights.scaling
            if self.packed_bottleneck is not None:
                per_slot = self.packed_bottleneck.setdefault(
                    (layer, group, act), [None] * self.num_slots
                )
                per_slot[slot] = pack_bottleneck(
                    buf.A, buf.b_down, buf.B, buf.b_up, weights.scaling, slot, r, act
                )
        self.slot_activation[slot] = act
        self.version += 1


class AdapterHook:
    """The DeltaHook of one step: per-token LoRA deltas and bottleneck updates."""

    def __init__(self, slots: DeviceSlots, meta: SegmentMeta, activations: tuple[str, ...]) -> None:
        self.slots, self.meta, self.activations = slots, meta, activations

    def decode_plan(self, layers: int) -> DecodePlan | None:
        """The step's deltas as a DecodePlan (what apply() runs in half precision on the CPU
        with the C++ kernels); None without the backend's one-call decode stack.
        The last plan is reused while the step's segments and the slots' contents are those
        it was built for (building one costs ~1-4 ms on a 30-layer model with 32 adapters)."""
        slots = self.slots
        if not slots.backend.decode_stack or slots.packed is None:
            return None
        assert slots.packed_bottleneck is not None  # packed with the LoRAs
        meta = self.meta
        key = (
            slots.version, layers, self.activations, meta.in_order,
            tuple(meta.seg_starts_list), tuple(meta.seg_slots_list),
        )  # fmt: skip
        if slots._plan is not None and slots._plan[0] == key:
            # Rows are positions in this step's sorted order: the same segments, other tokens.
            return replace(slots._plan[1], sorted_tokens=meta.sorted_tokens)
        plan = self._build_plan(layers)
        slots.plans_built += 1
        slots._plan = None if plan is None else (key, plan)
        return plan

    def _build_plan(self, layers: int) -> DecodePlan | None:
        slots, meta = self.slots, self.meta
        plan = DecodePlan(meta.sorted_tokens, meta.in_order)
        t, spec = plan.tensors, plan.spec
        for layer in range(layers):
            for group in GROUPS:
                items: list[int] = []
                n_items = 0
                packed = slots.packed.get((layer, group))
                if packed is not None:
                    bounds, A, B_blocks, ranks = lora_rows_args(packed, meta)
                    if A:
                        offsets = next(p for p in packed if p is not None).offsets
                        n_items += 1
                        items += [LORA_ROWS, len(A), len(offsets) - 1, *offsets]
                        for j in range(len(A)):
                            items += bounds[2 * j : 2 * j + 2]
                            items += ranks[j * (len(offsets) - 1) : (j + 1) * (len(offsets) - 1)]
                            t += [A[j], B_blocks[j]]
                for act in self.activations:
                    pb = slots.packed_bottleneck.get((layer, group, act))
                    if pb is None:
                        if slots.bottleneck.get((layer, group, act)) is not None:
                            return None  # only stacked buffers: apply() runs lowrank_delta
                        continue
                    bounds, (A, b_down, B_t, b_up), scales = bottleneck_rows_args(pb, meta)
                    if not scales:
                        continue
                    n_items += 1
                    items += [BOTTLENECK_ROWS, len(scales), activation_code(act), *bounds]
                    for j in range(len(scales)):
                        t += [A[j], b_down[j], B_t[j], b_up[j]]
                    plan.scales += scales
                spec.append(n_items)
                spec += items
        return plan

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (updated in place)
        slots, backend = self.slots, self.slots.backend
        lora = slots.lora.get((layer, module))
        if lora is not None:
            packed = None if slots.packed is None else slots.packed[(layer, module)]
            backend.lowrank_delta(y, x, lora.A, lora.B, lora.rank, lora.scale, self.meta,
                                  lora.slice_sizes, packed)  # fmt: skip
        # Half precision with packed weights (the CPU backend): exact ranks, token by token;
        # fp32, the parity dtype, and the other backends read the stacked buffers.
        packed_bn = slots.packed_bottleneck if y.dtype != torch.float32 else None
        for act in self.activations:
            pb = None if packed_bn is None else packed_bn.get((layer, module, act))
            if pb is not None:
                backend.bottleneck_rows(y, pb, self.meta)
                continue
            bn = slots.bottleneck.get((layer, module, act))
            if bn is not None:
                # The bottleneck reads the sub-layer output it updates: give it a copy.
                backend.lowrank_delta(
                    y, y.clone(), bn.A, bn.B, bn.rank, bn.scale, self.meta, bn.slice_sizes,
                    b_down=bn.b_down, b_up=bn.b_up, act=act,
                )  # fmt: skip
