"""The one-launch LoRA kernels (triton_lowrank_rows.py) as an adapted module runs them: in a
row after its base matmul (lowrank_delta_rows_triton), or in two halves around it
(config.lora_overlap), the first begun before the matmul on a second stream where one is given,
beside it in the same CUDA graph: the shrink alone (shrink_stage), or the shrink and the expand
into a delta of their own (delta_stage), which the second half adds to the matmul's output.

    v, ranks = shrink_stage(x, A, rank, token_slot, stream=side)     # beside the matmul
    y = x @ W.T; wait for side
    expand_rows_triton(y, v, B, rank, scale, token_slot, slice_sizes, token_rank=ranks)

The launches, tiles and form constants are triton_lowrank_rows.py's, read from it at each call
(the tests and the benchmark switch them there). Imported lazily, like it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import triton_lowrank_rows as rows
from .lora_tiles import Tiles


def shrink_stage(
    x: torch.Tensor, A: torch.Tensor, rank: torch.Tensor, token_slot: torch.Tensor,
    tiles: Tiles | None = None, stream: torch.cuda.Stream | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """lowrank_delta_rows_triton's shrink -> (v, each token's ranks where TOKEN_RANKS, else
    None): what expand_rows_triton takes as v and token_rank. Its splits come from `tiles`
    (default_tiles), its outputs are allocated on the current stream. With `stream` (CUDA) it
    runs there, once the current stream's work so far is done, beside what the current stream
    runs next (a LoRA's shrink beside the base matmul): the current stream must wait for
    `stream` before it reads the outputs, and keep x alive until then."""
    tiles = tiles or rows.default_tiles("shrink")
    v, ranks = _shrink_outputs(x, A, tiles)
    _beside(stream, x.device, lambda: rows.shrink_rows_triton(
        x, A, rank, token_slot, v.shape[0], tiles, out=v, ranks_out=ranks))
    return v, ranks


class Delta(NamedTuple):
    """delta_stage's delta, with the shrink's outputs it went through: all three kept alive
    until the current stream has waited for the stream they were filled on (a block freed
    earlier could be handed to the current stream's next tensor while the other still writes)."""

    d: torch.Tensor  # [T, out_total] float32
    v: torch.Tensor
    ranks: torch.Tensor | None


def delta_stage(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank: torch.Tensor, scale: torch.Tensor,
    token_slot: torch.Tensor, slice_sizes: tuple[int, ...],
    tiles: tuple[Tiles | None, Tiles | None] = (None, None),
    stream: torch.cuda.Stream | None = None,
) -> Delta:  # fmt: skip
    """A LoRA's whole delta, shrink and expand, into a new float32 d [T, out_total] (zero
    where a token has no adapter); allocated, and run on `stream`, as shrink_stage's shrink
    is: beside the base matmul, as the delta need not wait for y. `y.add_(d)` then gives
    lowrank_delta_rows_triton's y: the expand writes its float32 delta into d (every entry:
    no zero fill first), and add_ rounds y + d to y's dtype once, as the expand does into y."""
    shrink = tiles[0] or rows.default_tiles("shrink")
    d = torch.empty(x.shape[0], sum(slice_sizes), dtype=torch.float32, device=x.device)
    v, ranks = _shrink_outputs(x, A, shrink)

    def run() -> None:
        rows.shrink_rows_triton(x, A, rank, token_slot, v.shape[0], shrink, out=v,
                                ranks_out=ranks)  # fmt: skip
        rows.expand_rows_triton(d, v, B, rank, scale, token_slot, slice_sizes, tiles=tiles[1],
                                token_rank=ranks, add=False)  # fmt: skip

    _beside(stream, x.device, run)
    return Delta(d, v, ranks)


def _shrink_outputs(x: torch.Tensor, A: torch.Tensor, tiles: Tiles
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The shrink's v at `tiles`' splits and, where TOKEN_RANKS, its ranks, unfilled."""
    splits = rows.shrink_splits(x.shape[0], A.shape[0], x.shape[1], tiles, A.shape[2])
    v = rows.shrink_output(x, A, splits)
    ranks = (torch.empty(A.shape[0], x.shape[0], dtype=torch.int32, device=x.device)
             if rows.TOKEN_RANKS else None)  # fmt: skip
    return v, ranks


def _beside(stream: torch.cuda.Stream | None, device: torch.device, run) -> None:
    """run() now, or with `stream` on that stream once the current one's work so far is done."""
    if stream is None:
        run()
        return
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()


def lowrank_delta_rows_triton(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    token_slot: torch.Tensor,  # [T] int on the device, -1 = no adapter
    slice_sizes: tuple[int, ...],
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max]
    b_up: torch.Tensor | None = None,  # [S, out_total]
    act: str | None = None,
    tiles: tuple[Tiles | None, Tiles | None] = (None, None),  # (shrink, expand); None: default
) -> torch.Tensor:  # y
    """Shrink then expand, two launches whatever the adapters (reference.lowrank_delta_reference).
    Arguments are not checked here (checks.check_lowrank_args, which reads no device data)."""
    v, ranks = shrink_stage(x, A, rank, token_slot, tiles[0])
    return rows.expand_rows_triton(y, v, B, rank, scale, token_slot, slice_sizes,
                                   b_down=b_down, b_up=b_up, act=act, tiles=tiles[1],
                                   token_rank=ranks)  # fmt: skip
