"""Residency of adapters on the device: which adapter holds which slot, which shared prefixes
are built, and the admission decisions the scheduler asks for. Engine thread only.

Admission only decides (which slot, which KV blocks); the device work a decision needs (an
adapter's weights into its slot, a prefix's KV into its blocks) waits in `_pending` until the
engine step calls `prepare()` before it runs the batch. A failure there fails the sequences that
needed that work, and no other."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from peftserve.adapters.admission import Admission, AdmittedSeq, BlockPool
from peftserve.adapters.errors import PeftServeError
from peftserve.adapters.handle import AdapterInfo, AdapterKind
from peftserve.adapters.loader import LoadedAdapter
from peftserve.adapters.registry import AdapterEntry, AdapterRegistry
from peftserve.adapters.shared_prefix import SharedPrefix
from peftserve.adapters.slots import DeviceSlots

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


@dataclass(eq=False)
class _Work:
    """Device work an admission decided on, done by `prepare()`. `shared` work (a slot's
    weights, a shared prefix's KV) runs even when none of its sequences made the batch: the
    adapter now owns that slot or prefix. A sequence's own work is skipped when it did not."""

    entry: AdapterEntry
    run: Callable[[], None]
    undo: Callable[[], None]  # after a failed run, or instead of a skipped one
    shared: bool
    seqs: list[AdmittedSeq] = field(default_factory=list)  # cannot run without it


class AdapterManager:
    def __init__(
        self,
        registry: AdapterRegistry,
        slots: DeviceSlots,
        blocks: BlockPool,
        writer: PrefixWriter,
    ) -> None:
        self.registry, self.slots, self.blocks, self.writer = registry, slots, blocks, writer
        self.slot_owner: list[AdapterEntry | None] = [None] * slots.num_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict()
        # Keyed ("slot", slot), ("prefix", id(prefix)) or ("seq", id(seq)); in decision order.
        self._pending: dict[tuple[str, int], _Work] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # --- registration (engine thread) -------------------------------------------------------

    def add_loaded(
        self, name: str, loaded: LoadedAdapter, source: Path, replace: bool = False
    ) -> AdapterInfo:
        """Registers weights already read by `registry.load_from_disk` (off this thread).
        With `replace`, new requests get the new weights at once; running ones finish on the
        old ones, whose device state is freed when they are done."""
        return self.registry.add(name, loaded, source, replace, on_replaced=self.retire).info()

    def register(self, name: str, path: str | Path, replace: bool = False) -> AdapterInfo:
        """Reads and registers in one call (offline use; the server loads off the step loop)."""
        return self.add_loaded(name, self.registry.load_from_disk(Path(path)), Path(path), replace)

    def unregister(self, name: str) -> None:
        """The name is gone at once; requests already using the adapter finish normally."""
        self.retire(self.registry.remove(name))

    def infos(self) -> list[AdapterInfo]:
        return [e.info() for e in self.registry.entries()]

    def info(self, name: str) -> AdapterInfo:
        return self.registry.get(name).info()

    # --- requests ---------------------------------------------------------------------------

    def attach(self, seq: AdmittedSeq, entry: AdapterEntry) -> None:
        seq.adapter = entry
        entry.active += 1
        entry.requests_served += 1

    def detach(self, seq: AdmittedSeq) -> None:
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

    def admit(self, seq: AdmittedSeq) -> Admission:
        """READY, WAIT, or FAILED with `seq.error` set. Decides where this sequence's adapter
        goes (a slot, a shared prefix) without writing it; `prepare()` writes it."""
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
        if entry.kind in SLOT_KINDS:
            slot = self._slot_for(entry)
            if slot is None:
                return Admission.WAIT
            seq.slot = slot
            self._needs(("slot", slot), seq)
        elif entry.kind is not AdapterKind.PROMPT_TEMPLATE or seq.prefix_len:
            if not self._attach_prefix(seq, entry):
                return Admission.WAIT
        entry.running += 1
        seq.pinned = True
        return Admission.READY

    def on_preempt(self, seq: AdmittedSeq) -> None:
        """Called after the scheduler freed the sequence's blocks."""
        self._unpin(seq)

    def _unpin(self, seq: AdmittedSeq) -> None:
        if seq.pinned:
            assert seq.adapter is not None
            seq.adapter.running -= 1
        seq.slot, seq.pinned = -1, False
        work = self._pending.pop(("seq", id(seq)), None)
        if work is not None:
            work.undo()  # its blocks are gone with the sequence's

    def reclaim_blocks(self) -> bool:
        """Frees the shared prefix of one idle adapter; True if blocks came back."""
        for entry in self.registry.entries():
            if entry.prefix is not None and entry.running == 0:
                self._drop_prefix(entry)
                return True
        return False

    # --- the engine step's side -------------------------------------------------------------

    def prepare(self, scheduled: Iterable[AdmittedSeq]) -> list[AdmittedSeq]:
        """Does the device work the admissions since the last call decided on. Returns the
        scheduled sequences it failed for (`seq.error` set): their adapter could not be placed
        (a bug or a value the device refused), which fails them alone; the engine ends them
        and runs the rest of the batch."""
        if not self._pending:  # most steps: every adapter already in place
            return []
        failed: list[AdmittedSeq] = []
        in_batch = {id(seq) for seq in scheduled}
        work_list = list(self._pending.values())
        self._pending.clear()
        for work in work_list:
            live = [s for s in work.seqs if id(s) in in_batch and s.error is None]
            if not live and not work.shared:
                work.undo()
                continue
            try:
                work.run()
            except Exception as e:  # a bug or a bad value: these requests fail, the batch goes on
                work.undo()
                name = work.entry.name
                log.warning("adapter %s could not be placed on the device: %s: %s", name,
                            type(e).__name__, e)  # fmt: skip
                for seq in live:
                    seq.error = f"adapter {name!r} could not be prepared: {e}"
                    failed.append(seq)
        return failed

    def _needs(self, key: tuple[str, int], seq: AdmittedSeq) -> None:
        work = self._pending.get(key)
        if work is not None and all(s is not seq for s in work.seqs):
            work.seqs.append(seq)

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
        loaded = entry.loaded
        assert loaded is not None
        self.slot_owner[slot] = entry
        entry.slot = slot
        self._slot_lru.pop(slot, None)
        self._slot_lru[slot] = None

        def write() -> None:
            if loaded.lora is not None:
                self.slots.write_lora(slot, loaded.lora)
            elif loaded.bottleneck is not None:
                self.slots.write_bottleneck(slot, loaded.bottleneck)

        def undo() -> None:
            self.slots.clear(slot)  # a half-written slot serves nobody
            if self.slot_owner[slot] is entry:
                self._release_slot(entry)

        key = ("slot", slot)
        self._pending.pop(key, None)  # an evicted adapter's load that never ran
        self._pending[key] = _Work(entry, write, undo, shared=True)
        return slot

    def _release_slot(self, entry: AdapterEntry) -> None:
        assert entry.slot is not None
        self.slot_owner[entry.slot] = None
        self._slot_lru.pop(entry.slot, None)
        entry.slot = None

    def _drop_device(self, entry: AdapterEntry) -> None:
        if entry.slot is not None:
            self._pending.pop(("slot", entry.slot), None)
            self.slots.clear(entry.slot)
            self._release_slot(entry)
        self._drop_prefix(entry)

    # --- shared prefixes --------------------------------------------------------------------

    def _new_prefix(self, entry: AdapterEntry, seq: AdmittedSeq) -> SharedPrefix | None:
        """Blocks for a prefix of `seq`'s first prefix_len tokens; its KV is written later."""
        n = seq.prefix_len
        need = self.blocks.blocks_for(n)
        if not self.blocks.can_allocate(need) and not self._free_idle_prefixes(need):
            return None
        self.misses += 1
        return SharedPrefix(n, list(seq.token_ids[:n]), self.blocks.take(need))

    def _write_prefix(self, entry: AdapterEntry, prefix: SharedPrefix) -> None:
        loaded = entry.loaded
        assert loaded is not None
        if loaded.prefix_kv is not None:
            self.writer.write_prefix(prefix.blocks, kv=loaded.prefix_kv)
        elif loaded.prompt_embeds is not None:
            self.writer.write_prefix(prefix.blocks, embeds=loaded.prompt_embeds)
        else:
            self.writer.write_prefix(prefix.blocks, token_ids=prefix.token_ids)

    def _attach_prefix(self, seq: AdmittedSeq, entry: AdapterEntry) -> bool:
        prefix = entry.prefix
        if prefix is not None and prefix.token_ids != seq.token_ids[: seq.prefix_len]:
            prefix = None  # a template whose rendering differs (another chat history shape)
        built = prefix is None
        if prefix is None:
            if entry.prefix is not None and entry.running == 0:
                self._drop_prefix(entry)
            prefix = self._new_prefix(entry, seq)
            if prefix is None:
                return False
        else:
            self.hits += 1
        bs = self.blocks.block_size
        full, partial = divmod(prefix.length, bs)
        if partial and not self.blocks.can_allocate(1):
            if built:
                self.blocks.release(prefix.blocks)
            return False
        own = built and entry.prefix is not None  # another rendering holds the shared place
        if built and not own:
            entry.prefix = prefix
            self._pending[("prefix", id(prefix))] = _Work(
                entry,
                lambda: self._write_prefix(entry, prefix),
                lambda: self._drop_prefix(entry) if entry.prefix is prefix else None,
                shared=True,
            )
        self._needs(("prefix", id(prefix)), seq)
        self.blocks.share(prefix.blocks[:full])
        seq.block_table = list(prefix.blocks[:full])
        copy_to = None
        if partial:
            # The sequence writes its own tokens after the prefix's last entries: copy that block.
            copy_to = self.blocks.take(1)[0]
            seq.block_table.append(copy_to)
        if own or copy_to is not None:
            self._pending[("seq", id(seq))] = self._own_work(entry, prefix, own, copy_to, seq)
        seq.num_computed_tokens = prefix.length
        return True

    def _own_work(
        self,
        entry: AdapterEntry,
        prefix: SharedPrefix,
        own: bool,
        copy_to: int | None,
        seq: AdmittedSeq,
    ) -> _Work:
        """One sequence's part: its prefix when built for it alone (written, then released
        after the copy), and the copy of the prefix's last, partly filled block into its own."""
        released = False

        def release() -> None:
            nonlocal released
            if own and not released:
                released = True
                self.blocks.release(prefix.blocks)

        def run() -> None:
            try:
                if own:
                    self._write_prefix(entry, prefix)
                if copy_to is not None:
                    self.writer.copy_block(prefix.blocks[prefix.length // self.blocks.block_size],
                                           copy_to)  # fmt: skip
            finally:
                release()

        return _Work(entry, run, release, shared=False, seqs=[seq])

    def _free_idle_prefixes(self, need: int) -> bool:
        while not self.blocks.can_allocate(need):
            if not self.reclaim_blocks():
                return False
        return True

    def _drop_prefix(self, entry: AdapterEntry) -> None:
        prefix = entry.prefix
        if prefix is not None:
            self._pending.pop(("prefix", id(prefix)), None)
            self.blocks.release(prefix.blocks)
        entry.prefix = None
