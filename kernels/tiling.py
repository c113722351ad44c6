"""Tile sizes for the Triton kernels, chosen by shape.

Rows (BLOCK_M) follow the longest segment: a decode step has one row per slot, so a 64-row tile
would be 63/64 masked; segments longer than BLOCK_M are cut into chunks (`SegmentMeta.chunks`).
`tl.dot` needs every tile dim >= 16 on a GPU.

    longest segment   BLOCK_M | shrink BLOCK_N   BLOCK_K | expand BLOCK_N   BLOCK_K
    <= 16 (decode)        16  | rank tile        128     |  64              rank tile
    17..32                32  | rank tile         64     | 128              rank tile
    > 32 (prefill)        64  | rank tile         32     | 128              rank tile

Shrink: "rank tile" = next power of two >= R_max, clamped to 16..64; programs whose rank tile
starts at or past the slot's real rank exit at once, so a slot pays for at most one partly-masked
tile. BLOCK_K runs over `in` and is capped at the next power of two >= in.
Expand: BLOCK_K runs over the slot's real rank (loop bound read in the kernel), tile clamped to
16..32; BLOCK_N runs over the slice width, capped at the next power of two >= widest slice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    block_m: int  # token rows per program
    block_n: int  # output columns per program (rank for shrink, slice width for expand)
    block_k: int  # reduction step (in for shrink, rank for expand)
    num_warps: int


# Host-side arithmetic of launch grids and block sizes. triton.cdiv and triton.next_power_of_2
# are constexpr functions: called from Python, each costs a few microseconds, several times
# per launch (one per adapted projection per layer in an eager step).
def pow2_at_least(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), as triton.next_power_of_2 for n >= 1."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as triton.cdiv."""
    return -(-a // b)


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def _block_m(max_seg_len: int) -> int:
    if max_seg_len <= 16:
        return 16
    if max_seg_len <= 32:
        return 32
    return 64


def shrink_tiles(max_seg_len: int, r_max: int, d_in: int) -> Tiles:
    block_m = _block_m(max_seg_len)
    block_k = {16: 128, 32: 64, 64: 32}[block_m]
    return Tiles(
        block_m=block_m,
        block_n=_clamp(pow2_at_least(r_max), 16, 64),
        block_k=_clamp(pow2_at_least(d_in), 16, block_k),
        num_warps=4,
    )


def expand_tiles(max_seg_len: int, r_max: int, max_out: int) -> Tiles:
    block_m = _block_m(max_seg_len)
    block_n = 64 if block_m == 16 else 128
    return Tiles(
        block_m=block_m,
        block_n=_clamp(pow2_at_least(max_out), 16, block_n),
        block_k=_clamp(pow2_at_least(r_max), 16, 32),
        num_warps=4,
    )
