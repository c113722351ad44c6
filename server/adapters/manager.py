"""Residency of adapters on the device: which adapter holds which slot, which shared prefixes
are built, and the admission decisions the scheduler asks for. Engine thread only."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Protocol

import torch

from peftserve.adapters.errors import PeftServeError
from peftserve.adapters.handle import AdapterKind
from peftserve.adapters.registry import AdapterEntry, AdapterRegistry
from peftserve.adapters.shared_prefix import SharedPrefix
from peftserve.adapters.slots import DeviceSlots
from peftserve.engine.admission import Admission
from peftserve.engine.block_manager import BlockManager, blocks_for
from peftserve.engine.sequence import Sequence

log = logging.getLogger(__name__)

SLOT_KINDS = (AdapterKind.LORA, AdapterKind.BOTTLENECK)
PLACEHOLDER_TOKEN = 0  # stands in token_ids for virtual tokens; never embedded


class PrefixWriter(Protocol):
    """The model runner's side: fill KV blocks for a shared prefix, copy a block."""

    def write_prefix(
        self,
        blocks: list[int],
        *,
        kv: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        token_ids: list[int] | None = None,
    ) -> None: ...

    def copy_block(self, src: int, dst: int) -> None: ...


class AdapterManager:
    def __init__(
        self,
        registry: AdapterRegistry,
        slots: DeviceSlots,
        blocks: BlockManager,
        writer: PrefixWriter,
    ) -> None:
        self.registry, self.slots, self.blocks, self.writer = registry, slots, blocks, writer
        self.slot_owner: list[AdapterEntry | None] = [None] * slots.num_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # --- requests ---------------------------------------------------------------------------

    def attach(self, seq: Sequence, entry: AdapterEntry) -> None:
        seq.adapter = entry
        entry.active += 1
        entry.requests_served += 1

    def detach(self, seq: Sequence) -> None:
        """The sequence finished (or was aborted): drop its holds on the adapter."""
        entry = seq.adapter
        if entry is None:
            return
        self._unpin(seq)
        entry.active -= 1
        if entry.removed and entry.active == 0:
            self._drop_device(entry)

    def retire(self, entry: AdapterEntry) -> None:
        """`entry` was unregistered or replaced: free its device state once nobody uses it."""
        entry.removed = True
        if entry.active == 0:
            self._drop_device(entry)

    # --- the scheduler's questions ----------------------------------------------------------

    def admit(self, seq: Sequence) -> Admission:
        """READY, WAIT, or FAILED with `seq.error` set. Whatever goes wrong while preparing this
        sequence's adapter (loading, writing its slot or prefix) fails this sequence alone: the
        scheduler goes on admitting the others."""
        entry = seq.adapter
        if entry is None:
            return Admission.READY
        try:
            if not self.registry.ensure_host(entry):
                return Admission.WAIT
        except PeftServeError as e:
            log.warning("adapter %s failed to load: %s", entry.name, e)
            seq.error = f"adapter {entry.name!r} failed to load: {e}"
            return Admission.FAILED
        try:
            return self._place(seq, entry)
        except Exception as e:  # a bug or a bad value: this request fails, the batch goes on
            log.warning("adapter %s could not be placed on the device: %s: %s", entry.name,
                        type(e).__name__, e)
            seq.error = f"adapter {entry.name!r} could not be prepared: {e}"
            return Admission.FAILED

    def _place(self, seq: Sequence, entry: AdapterEntry) -> Admission:
        if entry.kind in SLOT_KINDS:
            slot = self._slot_for(entry)
            if slot is None:
                return Admission.WAIT
            seq.slot = slot
        elif entry.kind is not AdapterKind.PROMPT_TEMPLATE or seq.prefix_len:
            if not self._attach_prefix(seq, entry):
                return Admission.WAIT
        entry.running += 1
        seq.pinned = True
        return Admission.READY

    def on_preempt(self, seq: Sequence) -> None:
        """Called after the scheduler freed the sequence's blocks."""
        self._unpin(seq)

    def _unpin(self, seq: Sequence) -> None:
        if seq.pinned:
            seq.adapter.running -= 1
        seq.slot, seq.pinned = -1, False

    def reclaim_blocks(self) -> bool:
        """Frees the shared prefix of one idle adapter; True if blocks came back."""
        for entry in self.registry.entries():
            if entry.prefix is not None and entry.running == 0:
                self._drop_prefix(entry)
                return True
        return False

    # --- device slots -----------------------------------------------------------------------

    def _slot_for(self, entry: AdapterEntry) -> int | None:
        if entry.slot is not None:
            self.hits += 1
            self._slot_lru.move_to_end(entry.slot)
            return entry.slot
        slot = next((i for i, owner in enumerate(self.slot_owner) if owner is None), None)
        if slot is None:
            # Least recently used slot whose adapter no running sequence pins.
            slot = next((s for s in self._slot_lru if self.slot_owner[s].running == 0), None)  # type: ignore[union-attr]
            if slot is None:
                return None
            victim = self.slot_owner[slot]
            assert victim is not None
            victim.slot = None
            self.evictions += 1
        self.misses += 1
        self.slot_owner[slot] = None
        self._slot_lru.pop(slot, None)
        loaded = entry.loaded
        assert loaded is not None
        try:
            if loaded.lora is not None:
                self.slots.write_lora(slot, loaded.lora)
            elif loaded.bottleneck is not None:
                self.slots.write_bottleneck(slot, loaded.bottleneck)
        except BaseException:
            self.slots.clear(slot)  # a half-written slot serves nobody
            raise
        self.slot_owner[slot] = entry
        entry.slot = slot
        self._slot_lru[slot] = None
        self._slot_lru.move_to_end(slot)
        return slot

    def _drop_device(self, entry: AdapterEntry) -> None:
        if entry.slot is not None:
            self.slots.clear(entry.slot)
            self.slot_owner[entry.slot] = None
            self._slot_lru.pop(entry.slot, None)
            entry.slot = None
        self._drop_prefix(entry)

    # --- shared prefixes --------------------------------------------------------------------

    def _build_prefix(self, entry: AdapterEntry, seq: Sequence) -> SharedPrefix | None:
        loaded = entry.loaded
        assert loaded is not None
        n = seq.prefix_len
        need = blocks_for(n, self.blocks.block_size)
        if not self.blocks.can_allocate(need) and not self._free_idle_prefixes(need):
            return None
        blocks = self.blocks.take(need)
        ids = seq.token_ids[:n]
        try:
            if loaded.prefix_kv is not None:
                self.writer.write_prefix(blocks, kv=loaded.prefix_kv)
            elif loaded.prompt_embeds is not None:
                self.writer.write_prefix(blocks, embeds=loaded.prompt_embeds)
            else:
                self.writer.write_prefix(blocks, token_ids=ids)
        except BaseException:
            self.blocks.release(blocks)
            raise
        self.misses += 1
        return SharedPrefix(n, list(ids), blocks)

    def _attach_prefix(self, seq: Sequence, entry: AdapterEntry) -> bool:
        prefix = entry.prefix
        if isinstance(prefix, SharedPrefix) and prefix.token_ids != seq.token_ids[: seq.prefix_len]:
            prefix = None  # a template whose rendering differs (another chat history shape)
        if prefix is None:
            if entry.prefix is not None and entry.running == 0:
                self._drop_prefix(entry)
            prefix = self._build_prefix(entry, seq)
            if prefix is None:
                return False
            if entry.prefix is None:
                entry.prefix = prefix
        else:
            self.hits += 1
        assert isinstance(prefix, SharedPrefix)
        bs = self.blocks.block_size
        full, partial = divmod(prefix.length, bs)
        if partial and not self.blocks.can_allocate(1):
            return False
        self.blocks.share(prefix.blocks[:full])
        seq.block_table = list(prefix.blocks[:full])
        if partial:
            # The sequence writes its own tokens after the prefix's last entries: copy that block.
            own = self.blocks.take(1)[0]
            self.writer.copy_block(prefix.blocks[full], own)
            seq.block_table.append(own)
        if prefix is not entry.prefix:
            self.blocks.release(prefix.blocks)  # built for this sequence alone
        seq.num_computed_tokens = prefix.length
        return True

    def _free_idle_prefixes(self, need: int) -> bool:
        while not self.blocks.can_allocate(need):
            if not self.reclaim_blocks():
                return False
        return True

    def _drop_prefix(self, entry: AdapterEntry) -> None:
        prefix = entry.prefix
        if isinstance(prefix, SharedPrefix):
            self.blocks.release(prefix.blocks)
        entry.prefix = None
