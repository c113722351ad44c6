"""Paged KV cache bookkeeping: fixed-size blocks, block tables, refcounts. No tensors here."""

from __future__ import annotations

from collections import deque

from peftserve.engine.sequence import Sequence


class BlockManager:
    """Hands out KV blocks. A block is free when its refcount is 0; shared blocks (a prefix
    written once and read by many sequences) carry one reference per holder."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_tokens` tokens have a place."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"allocate {need} blocks with {len(self._free)} free")
        for _ in range(need):
            block = self._free.popleft()
            self.refcount[block] = 1
            seq.block_table.append(block)

    def take(self, num_blocks: int) -> list[int]:
        """Blocks held by their caller (a shared prefix) rather than by a sequence."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"take {num_blocks} blocks with {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for block in blocks:
            self.refcount[block] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Take one more reference on blocks already in use (shared prefixes)."""
        for block in blocks:
            if self.refcount[block] < 1:
                raise RuntimeError(f"share of free block {block}")
            self.refcount[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self._free.append(block)
            elif self.refcount[block] < 0:
                raise RuntimeError(f"block {block} released twice")

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []
