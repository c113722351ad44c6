from __future__ import annotations

import pytest

from peftserve.engine.block_manager import BlockManager
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import Sequence


def seq(n_tokens: int = 5) -> Sequence:
    return Sequence(0, "r", list(range(n_tokens)), SamplingParams())


def test_allocate_grows_block_table_to_cover_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq()
    bm.allocate(s, 5)
    assert len(s.block_table) == 2 and bm.num_free == 6
    bm.allocate(s, 8)  # still fits in two blocks
    assert len(s.block_table) == 2
    bm.allocate(s, 9)
    assert len(s.block_table) == 3
    bm.free(s)
    assert bm.num_free == 8 and s.block_table == []


def test_can_allocate_and_refusal_when_full():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq()
    assert bm.can_allocate(2) and not bm.can_allocate(3)
    with pytest.raises(RuntimeError):
        bm.allocate(s, 9)
    assert bm.num_free == 2 and s.block_table == []


def test_shared_blocks_are_freed_by_the_last_holder():
    bm = BlockManager(num_blocks=4, block_size=4)
    owner = seq()
    bm.allocate(owner, 8)
    shared = list(owner.block_table)
    bm.share(shared)
    bm.free(owner)
    assert bm.num_free == 2  # still held by the second reference
    bm.release(shared)
    assert bm.num_free == 4
    with pytest.raises(RuntimeError):
        bm.share(shared)
