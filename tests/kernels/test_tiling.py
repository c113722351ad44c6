"""Tile table: sizes a GPU `tl.dot` accepts, rows that follow the longest segment."""

from __future__ import annotations

import pytest
import triton

from peftserve.kernels.tiling import cdiv, expand_tiles, pow2_at_least, shrink_tiles


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("max_seg_len", [1, 16, 17, 32, 33, 512])
@pytest.mark.parametrize("r_max", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("width", [8, 33, 576, 1536])
def test_tiles_are_powers_of_two_of_at_least_16(max_seg_len, r_max, width):
    for tiles in (shrink_tiles(max_seg_len, r_max, width), expand_tiles(max_seg_len, r_max, width)):
        for size in (tiles.block_m, tiles.block_n, tiles.block_k):
            assert _pow2_at_least_16(size), tiles


@pytest.mark.parametrize(("max_seg_len", "block_m"), [(1, 16), (16, 16), (17, 32), (33, 64)])
def test_rows_follow_longest_segment(max_seg_len, block_m):
    assert shrink_tiles(max_seg_len, 64, 576).block_m == block_m
    assert expand_tiles(max_seg_len, 64, 576).block_m == block_m


def test_rank_tile_covers_small_ranks_in_one_program():
    assert shrink_tiles(1, 16, 576).block_n == 16
    assert shrink_tiles(1, 64, 576).block_n == 64
    assert shrink_tiles(1, 128, 576).block_n == 64  # two rank tiles; the second exits below 65


def test_host_arithmetic_is_tritons():
    """The launchers' plain-Python cdiv / pow2_at_least give what Triton's own would."""
    for n in [*range(1, 2100), 4095, 4096, 4097, 14336, 128256]:
        assert pow2_at_least(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 7, 16, 64, 128, 256):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
