"""Persistent input buffers of the static decode step: two pinned host buffers used in turn, one
device buffer of the same layout, and one host->device copy per step: the per-row fields, then
the block tables packed at the step's width, as far as the step fills them (a table as wide as
the longest context, copied whole, would be megabytes a step at a 128K context). Two host
buffers, because a step may be filled while the one before it is still queued (a step scheduled
ahead, Engine.step): its upload may not have read its buffer yet, but the step before that one
has been waited for, and so has its upload.

Every field is a fixed view of the device buffer, so a CUDA graph captured over a step reads the
step's new inputs where it read them at capture. A step of `rows` rows uses the first `rows`
entries of each field; rows past the step's sequences are padding (a dummy sequence of one
token whose K/V goes to a scratch block, see `pad`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

# int64 fields, [rows] each
INT_FIELDS = (
    "input_ids",  # the token each row feeds
    "positions",  # its position
    "slot_mapping",  # flat KV-cache slot its K/V is written to
    "context_lens",  # its context length, itself included
    "token_slot",  # its adapter slot, -1 = none
    "top_k",  # 0 = off
    "seed",  # its sampling stream (device_sampler.uniform)
    "counter",  # index of the token it samples
    "feed",  # a step scheduled ahead: the row of the step before whose sampled token it feeds
)
# float32 fields, [rows] each
FLOAT_FIELDS = ("temperature", "top_p", "penalty")


class StepBuffers:
    def __init__(self, rows: int, max_blocks: int, device: torch.device, pin: bool) -> None:
        """rows: the most rows a step has; max_blocks: block-table width (blocks per
        sequence at the longest context); pin: page-locked host memory (an asynchronous
        copy to a GPU)."""
        self.rows, self.max_blocks = rows, max_blocks
        n_float = len(FLOAT_FIELDS) * rows
        # the fields' bytes, rounded up to 8 so that the int64 block tables after them align
        self.fields_bytes = -(-(8 * len(INT_FIELDS) * rows + 4 * n_float) // 8) * 8
        nbytes = self.fields_bytes + 8 * rows * max_blocks
        self.hosts = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._np = [{k: v.numpy() for k, v in self._views(h).items()} for h in self.hosts]
        self.turn = 0  # the host buffer this step fills
        self.np = self._np[0]  # its views, to fill
        self.dev = self._views(self.device)  # the device views the step reads

    @property
    def host(self) -> torch.Tensor:
        return self.hosts[self.turn]

    def next_turn(self) -> int:
        """The other host buffer, for a new step to fill -> its index (a step's results use it
        too: StaticDecodeStep.host_out)."""
        self.turn ^= 1
        self.np = self._np[self.turn]
        return self.turn

    def _views(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        r, n_int = self.rows, len(INT_FIELDS) * self.rows
        ints = raw[: 8 * n_int].view(torch.int64)
        floats = raw[8 * n_int : 8 * n_int + 4 * len(FLOAT_FIELDS) * r].view(torch.float32)
        out = {name: ints[i * r : (i + 1) * r] for i, name in enumerate(INT_FIELDS)}
        out.update({name: floats[i * r : (i + 1) * r] for i, name in enumerate(FLOAT_FIELDS)})
        out["block_tables"] = raw[self.fields_bytes :].view(torch.int64)  # [rows * max_blocks]
        return out

    def block_tables(self, rows: int, width: int) -> torch.Tensor:
        """The device block tables of a step filled with `width` blocks a row: [rows, width]
        (contiguous: the rows are packed at that width)."""
        return self.dev["block_tables"][: rows * width].view(rows, width)

    def host_block_tables(self, rows: int, width: int) -> np.ndarray:
        return self.np["block_tables"][: rows * width].reshape(rows, width)

    def pad(self, start: int, rows: int, width: int, scratch_slot: int, block_size: int) -> None:
        """Rows start..rows-1 as the dummy sequence: one token at position 0, written to the
        scratch block's first slot, no adapter, greedy."""
        if start >= rows:
            return
        n = self.np
        for name in ("input_ids", "positions", "top_k", "seed", "counter"):
            n[name][start:rows] = 0
        n["slot_mapping"][start:rows] = scratch_slot
        n["context_lens"][start:rows] = 1
        n["token_slot"][start:rows] = -1
        n["temperature"][start:rows] = 0.0
        n["top_p"][start:rows] = 1.0
        n["penalty"][start:rows] = 1.0
        tables = self.host_block_tables(rows, width)
        tables[start:rows] = 0
        tables[start:rows, 0] = scratch_slot // block_size

    def upload(self, rows: int = 0, width: int = 0) -> None:
        """The one host->device copy of the step: every row's fields and the block tables of
        `rows` rows at `width` (none for a step that only samples). Asynchronous from pinned
        memory: the host buffer is only rewritten after the step's results came back, which
        orders the two."""
        end = self.fields_bytes + 8 * rows * width
        self.device[:end].copy_(self.host[:end], non_blocking=self.host.is_pinned())


class BlockTableRows:
    """Each decoding sequence's block table as an int64 array that grows as its list does (a
    sequence's list is only appended to, or replaced by another list: Sequence.block_table), so
    a step copies a row's table instead of converting a Python list: the same time at 16
    blocks a row, ~2x less at 64, ~10x at 512 (64 rows of 8K contexts: 1.6 ms a step against
    0.16 on a 2-core EPYC; bench/step_fill.py)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        # seq_id -> (the list mirrored, its array with room to grow, entries filled)
        self._rows: dict[int, tuple[list[int], np.ndarray, int]] = {}

    def row(self, seq_id: int, table: list[int]) -> np.ndarray:
        """`table` as an array [len(table)] (a view of the mirror; do not keep it)."""
        n = len(table)
        entry = self._rows.get(seq_id)
        if entry is not None and entry[2] == n and entry[0] is table:  # most steps
            return entry[1][:n]
        if entry is None or entry[0] is not table or entry[2] > n:  # new, or a new list
            arr, filled = np.empty(max(16, 2 * n), dtype=np.int64), 0
        else:
            _, arr, filled = entry
            if n > len(arr):
                grown = np.empty(2 * n, dtype=np.int64)
                grown[:filled] = arr[:filled]
                arr = grown
        if n > filled:
            arr[filled:n] = table[filled:n]
        self._rows[seq_id] = (table, arr, n)
        return arr[:n]

    def keep(self, seq_ids: Iterable[int]) -> None:
        """Forgets the sequences not in `seq_ids` once more than twice max_rows are held (the
        finished ones: nothing tells this object that a sequence ended)."""
        if len(self._rows) > 2 * self.max_rows:
            kept = set(seq_ids)
            self._rows = {k: v for k, v in self._rows.items() if k in kept}
