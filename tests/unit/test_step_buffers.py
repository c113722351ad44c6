"""The static decode step's input buffers (engine/step_buffers.py): every field its own bytes,
one copy a step, and that copy only as long as the step's block tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftserve.engine.step_buffers import FLOAT_FIELDS, INT_FIELDS, BlockTableRows, StepBuffers


@pytest.mark.parametrize("rows", [1, 3, 16])  # odd row counts: the tables still align
def test_every_field_reaches_its_device_view(rows):
    buf = StepBuffers(rows, max_blocks=5, device=torch.device("cpu"), pin=False)
    for i, name in enumerate(INT_FIELDS):
        buf.np[name][:] = np.arange(rows) + 1000 * (i + 1)
    for i, name in enumerate(FLOAT_FIELDS):
        buf.np[name][:] = np.arange(rows) + 0.5 + 10 * i
    tables = buf.host_block_tables(rows, 5)
    tables[:] = np.arange(rows * 5).reshape(rows, 5) + 7
    buf.upload(rows, 5)
    for i, name in enumerate(INT_FIELDS):
        assert buf.dev[name].tolist() == [1000 * (i + 1) + r for r in range(rows)], name
    for i, name in enumerate(FLOAT_FIELDS):
        assert buf.dev[name].tolist() == [r + 0.5 + 10 * i for r in range(rows)], name
    assert torch.equal(buf.block_tables(rows, 5), torch.from_numpy(tables.copy()))
    assert buf.dev["block_tables"].data_ptr() % 8 == 0


def test_a_step_copies_its_own_tables_and_no_more():
    buf = StepBuffers(4, max_blocks=100, device=torch.device("cpu"), pin=False)
    buf.np["input_ids"][:] = [1, 2, 3, 4]
    buf.host_block_tables(4, 100)[:] = 9  # a wide step's tables, never uploaded
    narrow = buf.host_block_tables(2, 3)
    narrow[:] = [[1, 2, 3], [4, 5, 6]]
    buf.upload(2, 3)
    assert buf.dev["input_ids"].tolist() == [1, 2, 3, 4]
    assert buf.block_tables(2, 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert int(buf.dev["block_tables"][6:].abs().sum()) == 0  # past 2 x 3: not copied
    buf.np["input_ids"][:] = 0
    buf.upload()  # a step that only samples: the fields alone
    assert buf.dev["input_ids"].tolist() == [0, 0, 0, 0]
    assert buf.block_tables(2, 3).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_block_table_rows_follow_appends_and_new_lists():
    rows = BlockTableRows(max_rows=2)
    table = [3, 1]
    assert rows.row(7, table).tolist() == [3, 1]
    table += range(10, 40)  # past the first array's room: it grows
    assert rows.row(7, table).tolist() == [3, 1, *range(10, 40)]
    assert rows.row(7, table).tolist() == [3, 1, *range(10, 40)]  # nothing new
    table.append(99)
    assert rows.row(7, table)[-2:].tolist() == [39, 99]
    # A new list (freed and allocated again, or a shared prefix), even a shorter one: re-read.
    assert rows.row(7, [5, 6]).tolist() == [5, 6]
    assert rows.row(7, [8, 6, 4]).tolist() == [8, 6, 4]
    # Finished sequences are forgotten once more than twice max_rows are held.
    for seq_id in range(8):
        rows.row(100 + seq_id, [seq_id])
    rows.keep([7, 100])
    assert sorted(rows._rows) == [7, 100]
    rows.keep([7])  # within the limit: nothing to forget yet
    assert sorted(rows._rows) == [7, 100]
