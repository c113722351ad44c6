"""Decides who runs each step: admission within a token budget and free KV blocks, chunked
prefill joining running decodes (continuous batching), preemption by recompute. No tensors: what
a decision needs on the device (an adapter's slot, a prefix's KV) is done by the engine step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from peftserve.adapters.admission import Admission, AdmissionPolicy, BaseOnly
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.sequence import FinishReason, SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step: 1 for a decode, a chunk for a prefill

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last uncomputed token."""
        return self.num_new_tokens == self.seq.num_uncomputed


@dataclass(frozen=True)
class ScheduledBatch:
    decodes: list[ScheduledSeq]  # one new token each (read through the cache)
    prefills: list[ScheduledSeq]  # chunks of prompts (or of recomputed sequences)
    preempted: list[Sequence]
    failed: list[Sequence]  # their adapter could not be loaded; the engine ends them

    @property
    def items(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.items)

    def __len__(self) -> int:
        return len(self.decodes) + len(self.prefills)

    def without(self, seqs: list[Sequence]) -> ScheduledBatch:
        """This batch less `seqs` (failed after scheduling), which join `failed`."""
        gone = {id(s) for s in seqs}
        keep = lambda items: [i for i in items if id(i.seq) not in gone]  # noqa: E731
        return ScheduledBatch(
            keep(self.decodes), keep(self.prefills), self.preempted, self.failed + list(seqs)
        )


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self.blocks = block_manager
        self.admission: AdmissionPolicy = admission or BaseOnly()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        failed: list[Sequence] = []
        scheduled: list[Sequence] = []
        # Running sequences first, oldest first; the newest is preempted when blocks run out.
        queue = deque(self.running)
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_uncomputed, budget)
            need = self.blocks.blocks_needed(seq, seq.num_computed_tokens + n)
            while not self._make_room(need):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            item = ScheduledSeq(seq, n)
            # A single new token attends through the cache like a decode, whatever its history.
            (decodes if n == 1 else prefills).append(item)
            scheduled.append(seq)
            budget -= n
        # Sequences left in `queue` got no budget this step; they stay running.
        if not preempted:
            self._admit(budget, prefills, scheduled, failed)
        chosen = {id(s) for s in scheduled}  # not `s in scheduled`: quadratic in the batch
        self.running = scheduled + [
            s for s in self.running if id(s) not in chosen and s.status is SeqStatus.RUNNING
        ]
        return ScheduledBatch(decodes, prefills, preempted, failed)

    def _admit(
        self,
        budget: int,
        prefills: list[ScheduledSeq],
        scheduled: list[Sequence],
        failed: list[Sequence],
    ) -> None:
        admitted = 0
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) + admitted >= self.max_num_seqs:
                break
            verdict = self.admission.admit(seq)
            if verdict is Admission.WAIT:
                continue  # its adapter is not ready; it does not hold up the others
            if verdict is Admission.FAILED:
                self.waiting.remove(seq)
                failed.append(seq)
                continue
            n = min(seq.num_uncomputed, budget)
            need = self.blocks.blocks_needed(seq, seq.num_computed_tokens + n)
            if not self._make_room(need):
                self._release(seq)
                break
            self.waiting.remove(seq)
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            prefills.append(ScheduledSeq(seq, n))
            scheduled.append(seq)
            admitted += 1
            budget -= n

    def _make_room(self, need: int) -> bool:
        """True when `need` blocks are free, after freeing idle shared prefixes if it helps."""
        while not self.blocks.can_allocate(need):
            if not self.admission.reclaim_blocks():
                return False
        return True

    def _release(self, seq: Sequence) -> None:
        """Gives back what admission or running took: KV blocks, the adapter pin."""
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        self.admission.on_preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the sequence's K/V; it prefills again when readmitted."""
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch) -> None:
        """Advance computed counts. The engine appends sampled tokens and calls `finish`."""
        for item in batch.items:
            item.seq.num_computed_tokens += item.num_new_tokens

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
