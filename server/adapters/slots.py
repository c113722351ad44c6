"""Device slot buffers: every resident LoRA / bottleneck adapter's weights stacked per module.

A slot index (not the adapter's id) picks an adapter's rows in each buffer. Kernels read each
slot's exact rank from `rank`; rank 0 means "no update here", so an adapter that targets only q,v
costs nothing on o/gate/up/down. Buffers are allocated on first use of a module.

Writing a slot does not wait for the device: the adapter's tensors go over in one asynchronous
copy from page-locked memory (`upload`), then into the buffers in two foreach copies (contiguous
destinations in a few launches, a launch each for the strided ones), and every module's ranks
and scales live in one table (`RankTable`), so a slot's are cleared, or written, in one op each.
Written module by module, a 30-layer all-linear LoRA took ~1,300 ops that move data, 420 of them
host-to-device copies that each waited for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from peftserve.adapters.bottleneck import BottleneckWeights
from peftserve.adapters.lora import LoraWeights, module_dims
from peftserve.adapters.upload import upload
from peftserve.kernels import SegmentMeta
from peftserve.kernels.activation import activation_code
from peftserve.kernels.cpu_packed import (
    PackedBottleneck,
    PackedLora,
    pack_bottleneck,
    pack_lora_layers,
)
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
GROUP_INDEX = {group: g for g, group in enumerate(GROUPS)}
MAX_SLICES = max(len(projs) for projs in GROUPS.values())
# Bottleneck placements act on the output of these projections (before the residual add).
PLACEMENT_GROUP = {"mh_adapter": "o", "output_adapter": "down"}
PLACEMENT_INDEX = {group: g for g, group in enumerate(PLACEMENT_GROUP.values())}
FP32_MAX = torch.finfo(torch.float32).max
# A module an adapter has deltas on: ("lora", layer, group) or ("bottleneck", layer, group, act).
ModuleKey = tuple[str | int, ...]
# A staged write sends B's rows whole (zeros past the rank, so that its destinations are
# contiguous: a few launches on a GPU instead of one per module) while that adds at most this
# many bytes to the upload (a rank-8 LoRA under max rank 64 at an 8B shape would add ~150 MB).
WHOLE_ROWS_MAX_EXTRA = 32 << 20


def lora_row(layer: int, group: str) -> int:
    """A LoRA module's row of the LoRA rank table."""
    return layer * len(GROUPS) + GROUP_INDEX[group]


def bottleneck_row(layer: int, group: str) -> int:
    """A bottleneck placement's row of its activation's rank table."""
    return layer * len(PLACEMENT_INDEX) + PLACEMENT_INDEX[group]


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


class RankTable:
    """The per-slot ranks and scales of many modules ([rows, n_slices, S] in effect, each row a
    module): a module's `rank` and `scale` [n_slices, S] are views of its row, so a slot's
    entries across all modules are cleared, or written, in one op each."""

    def __init__(self, rows: int, n_slices: int, num_slots: int,
                 zeros: Callable[..., torch.Tensor]) -> None:  # fmt: skip
        """zeros(*shape, dtype=): zero-filled device storage."""
        self.n_slices, self.num_slots = n_slices, num_slots
        width = -(-n_slices * num_slots // 4) * 4  # each row's start 16-byte aligned
        self.rank = zeros(rows, width, dtype=torch.int32)
        self.scale = zeros(rows, width, dtype=torch.float32)

    def row(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A module's rank and scale, [n, S] each, for its first n slices."""
        S = self.num_slots
        return self.rank[row, : n * S].view(n, S), self.scale[row, : n * S].view(n, S)

    def columns(self, slot: int) -> list[torch.Tensor]:
        """A slot's ranks and scales, [rows, n_slices] each (strided views)."""
        n, S = self.n_slices, self.num_slots
        return [t[:, : n * S].view(-1, n, S)[:, :, slot] for t in (self.rank, self.scale)]

    def host_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed host tensors shaped like columns(): what a write fills, then copies."""
        shape = (self.rank.shape[0], self.n_slices)
        return torch.zeros(shape, dtype=torch.int32), torch.zeros(shape, dtype=torch.float32)


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
        # A row per layer and group; a row per layer and placement for each activation's.
        self._lora_table = RankTable(shape.layers * len(GROUPS), MAX_SLICES, num_slots, self._zeros)
        self._bottleneck_tables: dict[str, RankTable] = {}
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
        # The modules each written slot's adapter has deltas on (modules_of).
        self.slot_modules: dict[int, frozenset[ModuleKey]] = {}
        self._modules_of: tuple[tuple[int, frozenset[int]], frozenset[ModuleKey]] | None = None
        # Bumped by every write or clear: the last DecodePlan is reused while the step's
        # segments and this stay the same (consecutive decode steps of one batch).
        self.version = 0
        self._plan: tuple[tuple, DecodePlan] | None = None
        self.plans_built = 0  # DecodePlans built (the rest of the decode_plan() calls reused one)

    def _zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return self.backend.zeros(shape, dtype, self.device)

    def _new(self, d_in: int, sizes: tuple[int, ...], bias: bool, table: RankTable,
             row: int) -> StackedModule:  # fmt: skip
        """row: the module's row of `table`, where its ranks and scales are kept."""
        S, R, n, z = self.num_slots, self.max_rank, len(sizes), self._zeros
        rank, scale = table.row(row, n)
        # Zero-filled: the CPU path multiplies storage past a slot's rank by exact zeros.
        return StackedModule(
            A=z(n, S, R, d_in, dtype=self.dtype),
            B=z(S, sum(sizes), R, dtype=self.dtype),
            rank=rank,
            scale=scale,
            slice_sizes=sizes,
            b_down=z(S, R, dtype=self.dtype) if bias else None,
            b_up=z(S, sum(sizes), dtype=self.dtype) if bias else None,
            written=[[0] * S for _ in sizes],
        )

    def clear(self, slot: int) -> None:
        self.version += 1
        for table in (self._lora_table, *self._bottleneck_tables.values()):
            table.columns(slot)[0].zero_()
        if self.packed is not None:
            for per_slot in self.packed.values():
                per_slot[slot] = None
        if self.packed_bottleneck is not None:
            for per_slot_b in self.packed_bottleneck.values():
                per_slot_b[slot] = None
        self.slot_activation.pop(slot, None)
        self.slot_modules.pop(slot, None)

    def modules_of(self, slots: frozenset[int]) -> frozenset[ModuleKey]:
        """The modules the adapters in `slots` have deltas on: ("lora", layer, group) and
        ("bottleneck", layer, group, activation). A step whose rows hold only those slots
        needs no other module's deltas (a slot of none, -1, adds nothing). The last answer is
        kept while the slots and every slot's adapter stay the same (a batch's decode steps):
        the same object, so a dict keyed by it finds it by identity."""
        key = (self.version, slots)
        if self._modules_of is not None and self._modules_of[0] == key:
            return self._modules_of[1]
        found: set[ModuleKey] = set()
        for slot in slots:
            found |= self.slot_modules.get(slot, frozenset())
        self._modules_of = (key, frozenset(found))
        return self._modules_of[1]

    def write_lora(self, slot: int, weights: LoraWeights) -> None:
        self.clear(slot)
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        table = self._lora_table
        ranks, scales = table.host_columns()  # written with the weights
        rank_rows, scale_rows = ranks.numpy(), scales.numpy()
        whole = self._whole_rows((m.B.shape[0], m.B.shape[1]) for m in weights.modules.values())
        for (layer, proj), mod in weights.modules.items():
            group, i = GROUP_OF[proj]
            row = lora_row(layer, group)
            buf = self.lora.get((layer, group))
            if buf is None:
                d_in, sizes = self._dims[group]
                buf = self.lora[(layer, group)] = self._new(d_in, sizes, False, table, row)
            r = mod.A.shape[0]
            off = sum(buf.slice_sizes[:i])
            rows = buf.B[slot, off : off + buf.slice_sizes[i]]
            # Rows past r must be zero: only those an earlier adapter wrote need zeroing (the
            # rest never left the zero pages, and writing zeros would fault them all in).
            # B's rows written whole (_whole_rows: zeros past r, _copy_in) are contiguous.
            hw = buf.written[i][slot]
            if hw > r:
                buf.A[i, slot, r:hw].zero_()
                if not whole:
                    rows[:, r:hw].zero_()
            dst += [buf.A[i, slot, :r], rows if whole else rows[:, :r]]
            src += [mod.A, mod.B]
            buf.written[i][slot] = r
            rank_rows[row, i] = r
            scale_rows[row, i] = fp32_scale(mod.scale, f"layer {layer}'s {proj}")
        self._copy_in([*dst, *table.columns(slot)], [*src, ranks, scales])
        if self.packed is not None:
            modules = {(layer, GROUP_OF[proj][0]) for layer, proj in weights.modules}
            self._pack_lora(slot, modules, rank_rows, scale_rows)
        self.slot_modules[slot] = frozenset(
            ("lora", layer, GROUP_OF[proj][0]) for layer, proj in weights.modules
        )
        self.version += 1

    def _pack_lora(self, slot: int, modules: set[tuple[int, str]], rank_rows: np.ndarray,
                   scale_rows: np.ndarray) -> None:  # fmt: skip
        """Packs the slot's LoRA on `modules` ((layer, group)) for the CPU kernels, the layers
        of a group whose slices have the same ranks at once. rank_rows, scale_rows: the slot's
        column of the rank table as written [rows, MAX_SLICES]."""
        assert self.packed is not None
        batches: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for layer, group in sorted(modules):
            ranks = tuple(rank_rows[lora_row(layer, group), : len(GROUPS[group])].tolist())
            batches.setdefault((group, ranks), []).append(layer)
        for (group, ranks), layers in batches.items():
            bufs = [self.lora[(layer, group)] for layer in layers]
            rows = [lora_row(layer, group) for layer in layers]
            packed = pack_lora_layers([b.A for b in bufs], [b.B for b in bufs], ranks,
                                      scale_rows[rows, : len(ranks)].tolist(), slot,
                                      bufs[0].slice_sizes)  # fmt: skip
            for j, layer in enumerate(layers):
                per_slot = self.packed.setdefault((layer, group), [None] * self.num_slots)
                per_slot[slot] = None if packed is None else packed[j]

    def _copy_in(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """dst[i].copy_(src[i]) for host tensors src, each cast to its dst's dtype on the host
        (as `Tensor.to` would): one host-to-device copy, then two foreach copies. Staged, a
        2-D dst wider than its src (a slot's whole B rows) gets src and zeros past it."""
        if self._staged():
            widths = [d.shape[1] if d.dim() == 2 and s.dim() == 2 and d.shape[1] != s.shape[1]
                      else None for d, s in zip(dst, src, strict=True)]  # fmt: skip
            src = upload(src, [d.dtype for d in dst], self.device, widths)
        # Contiguous pairs apart: on a GPU, one foreach copy of many such tensors takes a few
        # launches; one with a strided destination takes a launch per tensor.
        dense = [d.is_contiguous() and s.is_contiguous() for d, s in zip(dst, src, strict=True)]
        for want in (True, False):
            pairs = [(d, s) for d, s, ok in zip(dst, src, dense, strict=True) if ok is want]
            if pairs:
                torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def _staged(self) -> bool:
        """Whether writes go through `upload` (else straight from the host tensors)."""
        return self.device.type != "cpu"

    def _whole_rows(self, b_shapes: Iterable[tuple[int, int]]) -> bool:
        """Whether a staged write sends B's rows whole: b_shapes, each module's B [rows, r]."""
        if not self._staged():
            return False
        extra = sum(n * (self.max_rank - r) for n, r in b_shapes) * self.dtype.itemsize
        return extra <= WHOLE_ROWS_MAX_EXTRA

    def write_bottleneck(self, slot: int, weights: BottleneckWeights) -> None:
        self.clear(slot)
        act = weights.activation
        table = self._bottleneck_tables.get(act)
        if table is None:
            table = self._bottleneck_tables[act] = RankTable(
                self.shape.layers * len(PLACEMENT_INDEX), 1, self.num_slots, self._zeros
            )
        ranks, scales = table.host_columns()
        rank_rows, scale_rows = ranks.numpy(), scales.numpy()
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        written: list[tuple[str, StackedModule, int]] = []
        whole = self._whole_rows((wu.shape[0], wu.shape[1]) for _, _, wu, _ in
                                 weights.modules.values())  # fmt: skip
        for (layer, placement), (wd, bd, wu, bu) in weights.modules.items():
            group = PLACEMENT_GROUP[placement]
            row = bottleneck_row(layer, group)
            buf = self.bottleneck.get((layer, group, act))
            if buf is None:
                hidden = self.shape.hidden
                buf = self.bottleneck[(layer, group, act)] = self._new(
                    hidden, (hidden,), True, table, row
                )
            assert buf.b_down is not None and buf.b_up is not None
            r = wd.shape[0]
            hw = buf.written[0][slot]  # as in write_lora: zero what an earlier adapter wrote
            if hw > r:
                buf.A[0, slot, r:hw].zero_()
                if not whole:
                    buf.B[slot, :, r:hw].zero_()
                buf.b_down[slot, r:hw].zero_()
            buf.written[0][slot] = r
            b = buf.B[slot] if whole else buf.B[slot, :, :r]  # as in write_lora
            dst += [buf.A[0, slot, :r], b, buf.b_down[slot, :r], buf.b_up[slot]]
            src += [wd, wu, bd, bu]
            rank_rows[row, 0] = r
            scale_rows[row, 0] = fp32_scale(weights.scaling, "the bottleneck")
            written.append((group, buf, r))
        self._copy_in([*dst, *table.columns(slot)], [*src, ranks, scales])
        if self.packed_bottleneck is not None:
            for (layer, _), (group, buf, r) in zip(weights.modules, written, strict=True):
                assert buf.b_down is not None and buf.b_up is not None
                per_slot = self.packed_bottleneck.setdefault(
                    (layer, group, act), [None] * self.num_slots
                )
                per_slot[slot] = pack_bottleneck(
                    buf.A, buf.b_down, buf.B, buf.b_up, weights.scaling, slot, r, act
                )
        self.slot_activation[slot] = act
        self.slot_modules[slot] = frozenset(
            ("bottleneck", layer, PLACEMENT_GROUP[placement], act)
            for layer, placement in weights.modules
        )
        self.version += 1


def fp32_scale(scale: float, where: str) -> float:
    """The scale as the kernels read it, in float32; refuses one that is not finite there."""
    if not math.isfinite(scale) or abs(scale) > FP32_MAX:
        raise ValueError(f"the scale of {where}, {scale:g}, is not a finite float32")
    return scale


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

    def begin(self, layer: int, module: str, x: torch.Tensor) -> None:
        """Every delta runs in apply()."""

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
