"""Scheduler decisions without a model: admission, budget, preemption."""

from __future__ import annotations

from peftserve.engine.block_manager import BlockManager
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.scheduler import Scheduler
from peftserve.engine.sequence import SeqStatus, Sequence


def make(seq_id: int, n: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(range(n)), SamplingParams())


def run_step(sched: Scheduler) -> None:
    """Pretend the model ran: advance counts and append a token to sampling sequences."""
    batch = sched.schedule()
    sched.postprocess(batch)
    for item in batch.items:
        if item.seq.num_uncomputed == 0:
            item.seq.token_ids.append(0)


def test_prefill_is_chunked_by_the_token_budget_and_decodes_go_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make(0, 4), make(1, 25)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [(i.seq.seq_id, i.num_new_tokens) for i in batch.prefills] == [(0, 4), (1, 6)]
    sched.postprocess(batch)
    a.token_ids.append(0)
    batch = sched.schedule()
    assert [i.seq.seq_id for i in batch.decodes] == [0]
    assert [(i.seq.seq_id, i.num_new_tokens) for i in batch.prefills] == [(1, 9)]
    assert batch.num_tokens == 10


def test_max_num_seqs_bounds_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sched.add(make(i, 3))
    batch = sched.schedule()
    assert len(batch) == 2 and len(sched.waiting) == 2


def test_newest_running_sequence_is_preempted_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = make(0, 4), make(1, 4)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled: 2 blocks each, all 4 used
    batch = sched.schedule()  # both need a third position -> a new block; none free
    assert batch.preempted == [new]
    assert new.status is SeqStatus.WAITING and new.num_computed_tokens == 0
    assert new.block_table == [] and sched.waiting[0] is new
    assert [i.seq for i in batch.decodes] == [old]


def test_waiting_request_waits_for_blocks_instead_of_partial_admission():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    sched.add(make(0, 8))
    sched.add(make(1, 3))
    run_step(sched)
    assert [s.seq_id for s in sched.running] == [0]
    assert [s.seq_id for s in sched.waiting] == [1]
