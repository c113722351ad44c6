"""build_segment_meta and SegmentMeta.chunks against a naive grouping of tokens by slot."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels import build_segment_meta


def _naive_groups(token_slot: list[int]) -> dict[int, list[int]]:
    """slot -> its tokens in order, for slots >= 0."""
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(token_slot):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    return dict(sorted(groups.items()))


def test_small_example():
    meta = build_segment_meta(torch.tensor([2, -1, 0, 2, 1, -1, 0]))
    assert meta.sorted_tokens.tolist() == [2, 6, 4, 0, 3]
    assert meta.sorted_slot.tolist() == [0, 0, 1, 2, 2]
    assert meta.seg_starts.tolist() == [0, 2, 3, 5]
    assert meta.seg_slots.tolist() == [0, 1, 2]
    assert meta.seg_starts_list == (0, 2, 3, 5) and meta.seg_slots_list == (0, 1, 2)
    assert meta.num_tokens == 7 and meta.num_active_tokens == 5 and meta.max_seg_len == 2
    assert meta.slot_span == (0, 3)
    assert meta.pad_index.tolist() == [0, 1, 2, 4, 5]  # rows of a [3 slots, 2 rows] layout
    assert meta.token_slot.dtype == torch.int32


@pytest.mark.parametrize("n_tokens", [1, 17, 300])
@pytest.mark.parametrize("n_slots", [1, 5, 64])
def test_segments_match_naive_grouping(n_tokens, n_slots):
    g = torch.Generator().manual_seed(n_tokens * 100 + n_slots)
    token_slot = torch.randint(-1, n_slots, (n_tokens,), generator=g)
    meta = build_segment_meta(token_slot)
    groups = _naive_groups(token_slot.tolist())
    assert list(meta.seg_slots_list) == list(groups)
    starts = meta.seg_starts_list
    for j, (slot, tokens) in enumerate(groups.items()):
        assert meta.sorted_tokens[starts[j] : starts[j + 1]].tolist() == tokens  # stable
        assert set(meta.sorted_slot[starts[j] : starts[j + 1]].tolist()) == {slot}
    assert meta.num_active_tokens == sum(len(t) for t in groups.values())
    assert meta.max_seg_len == max((len(t) for t in groups.values()), default=0)
    assert meta.seg_starts.tolist() == list(starts)


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
def test_chunks_cover_each_segment_in_order(block_m):
    token_slot = torch.tensor([3] * 37 + [-1] * 5 + [0] * 4 + [7] * 16)
    meta = build_segment_meta(token_slot)
    chunks = meta.chunks(block_m)
    assert meta.chunks(block_m) is chunks  # built once per step and block size
    rows = []
    for slot, start, length in zip(
        chunks.chunk_slot.tolist(),
        chunks.chunk_start.tolist(),
        chunks.chunk_len.tolist(),
        strict=True,
    ):
        assert 1 <= length <= block_m
        segment_rows = meta.sorted_tokens[start : start + length]
        assert (token_slot[segment_rows] == slot).all()
        rows.extend(range(start, start + length))
    assert rows == list(range(meta.num_active_tokens))
    assert chunks.num_chunks == sum(-(-n // block_m) for n in (4, 37, 16))


def test_base_only_step_is_empty():
    meta = build_segment_meta(torch.full((6,), -1))
    assert meta.is_empty and meta.num_segments == 0 and meta.max_seg_len == 0
    assert meta.sorted_tokens.numel() == 0 and meta.chunks(16).num_chunks == 0


def test_no_tokens():
    meta = build_segment_meta(torch.zeros(0, dtype=torch.int64))
    assert meta.is_empty and meta.num_tokens == 0


@pytest.mark.parametrize(
    ("token_slot", "message"),
    [
        (torch.zeros(2, 3, dtype=torch.int64), "1-D"),
        (torch.zeros(3), "integer"),
        (torch.tensor([0, -2, 1]), "-1 for none"),
    ],
)
def test_rejects_bad_token_slot(token_slot, message):
    with pytest.raises(ValueError, match=message):
        build_segment_meta(token_slot)


def test_rejects_bad_block_m():
    with pytest.raises(ValueError, match="block_m"):
        build_segment_meta(torch.tensor([0, 1])).chunks(0)
