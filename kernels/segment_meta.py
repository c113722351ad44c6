"""Per-step grouping of tokens by adapter slot (the SGMV segment metadata).

The engine builds one `SegmentMeta` per step from the token -> slot map and hands the same object
to every layer and module, so the sort, the host copies and the chunk tables are paid once per
step. Kernels see slot indices only, never adapter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SegmentChunks:
    """Segments cut into chunks of at most `block_m` rows (SGLang's chunked SGMV).

    A decode step (one token per sequence) then launches one program per chunk instead of
    `cdiv(max_segment_len, block_m)` programs per segment, most of which would exit at once.
    """

    block_m: int
    chunk_slot: torch.Tensor  # [C] int32, slot of each chunk
    chunk_start: torch.Tensor  # [C] int32, first row of the chunk in `sorted_tokens`
    chunk_len: torch.Tensor  # [C] int32, rows in the chunk, 1..block_m
    num_chunks: int


@dataclass(frozen=True, eq=False)
class SegmentMeta:
    """Tokens of one step grouped by slot; build it with `build_segment_meta`.

    Segment j holds the tokens `sorted_tokens[seg_starts[j]:seg_starts[j + 1]]`, all of which use
    slot `seg_slots[j]`. Segments are ordered by ascending slot and each active slot has exactly
    one segment; tokens with slot -1 appear in no segment. The `*_list` tuples are host copies for
    the CPU path and for launch decisions, so neither needs a device sync.
    """

    token_slot: torch.Tensor  # [T] int32, slot of each token, -1 = no adapter
    sorted_tokens: torch.Tensor  # [T_active] int64, token indices stably sorted by slot
    sorted_slot: torch.Tensor  # [T_active] int64, slot of each row of `sorted_tokens`
    pad_index: torch.Tensor  # [T_active] int64, row in a [span * max_seg_len] padded layout
    seg_starts: torch.Tensor  # [n_seg + 1] int32, row offsets into `sorted_tokens`
    seg_slots: torch.Tensor  # [n_seg] int32, slot of each segment, ascending
    num_tokens: int  # T, including tokens without an adapter
    seg_starts_list: tuple[int, ...]  # host copy of `seg_starts`
    seg_slots_list: tuple[int, ...]  # host copy of `seg_slots`
    max_seg_len: int  # longest segment, 0 when no token has an adapter
    slot_span: tuple[int, int]  # (first, last + 1) active slot; (0, 0) when none
    # Every token has a slot and the tokens are already grouped by slot (sorted_tokens is
    # 0..T-1): the CPU path then reads and writes row ranges in place, without gather/scatter.
    in_order: bool = False
    _chunks: dict[int, SegmentChunks] = field(default_factory=dict, repr=False)

    @property
    def num_segments(self) -> int:
        return len(self.seg_slots_list)

    @property
    def num_active_tokens(self) -> int:
        return self.seg_starts_list[-1]

    @property
    def is_empty(self) -> bool:
        """True for a base-only step: every op returns at once."""
        return not self.seg_slots_list

    @property
    def all_tokens_active(self) -> bool:
        return self.num_active_tokens == self.num_tokens

    def chunks(self, block_m: int) -> SegmentChunks:
        """Segments cut into chunks of <= `block_m` rows; built once per `block_m` and cached."""
        if block_m < 1:
            raise ValueError(f"block_m must be >= 1, got {block_m}")
        cached = self._chunks.get(block_m)
        if cached is not None:
            return cached
        slots: list[int] = []
        starts: list[int] = []
        lens: list[int] = []
        for j, slot in enumerate(self.seg_slots_list):
            begin, end = self.seg_starts_list[j], self.seg_starts_list[j + 1]
            for start in range(begin, end, block_m):
                slots.append(slot)
                starts.append(start)
                lens.append(min(block_m, end - start))
        table = torch.tensor([slots, starts, lens], dtype=torch.int32)
        table = table.to(self.token_slot.device)
        chunks = SegmentChunks(block_m, table[0], table[1], table[2], len(slots))
        self._chunks[block_m] = chunks
        return chunks


def build_segment_meta(token_slot: torch.Tensor) -> SegmentMeta:
    """Group the tokens of one step by slot.

    token_slot: [T] integer tensor, the slot of each token or -1 for none, on the device the
    kernels will run on. The grouping is computed on the host (one device->host copy per step
    when `token_slot` lives on a GPU) and the results go back in one host->device copy.
    """
    if token_slot.dim() != 1:
        raise ValueError(f"token_slot must be 1-D [T], got shape {tuple(token_slot.shape)}")
    if token_slot.dtype.is_floating_point or token_slot.dtype.is_complex:
        raise ValueError(f"token_slot must be an integer tensor, got {token_slot.dtype}")
    device = token_slot.device
    host = token_slot.to("cpu", torch.int64)
    if host.numel() and int(host.min()) < -1:
        raise ValueError(f"token_slot holds {int(host.min())}; slots are >= 0, or -1 for none")

    active = torch.nonzero(host >= 0).flatten()  # [T_active] ascending token indices
    order = torch.sort(host[active], stable=True).indices
    sorted_tokens = active[order]  # [T_active]
    sorted_slot = host[sorted_tokens]  # [T_active]
    seg_slots, counts = torch.unique_consecutive(sorted_slot, return_counts=True)
    seg_starts = torch.zeros(seg_slots.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=seg_starts[1:])
    n_act, n_seg = sorted_tokens.numel(), seg_slots.numel()
    max_len = int(counts.max()) if n_seg else 0
    span = (int(seg_slots[0]), int(seg_slots[-1]) + 1) if n_seg else (0, 0)

    # Row of each sorted token when segments are laid out as [span slots, max_len rows]: the CPU
    # path's batched decode layout (see cpu_lowrank.py).
    row_in_seg = torch.arange(n_act) - torch.repeat_interleave(seg_starts[:-1], counts)
    pad_index = (sorted_slot - span[0]) * max_len + row_in_seg

    packed = torch.cat([sorted_tokens, sorted_slot, pad_index, seg_starts, seg_slots]).to(device)
    d_tokens, d_slot, d_pad, d_starts, d_slots = packed.split(
        [n_act, n_act, n_act, n_seg + 1, n_seg]
    )
    return SegmentMeta(
        token_slot=token_slot.to(device=device, dtype=torch.int32),
        sorted_tokens=d_tokens,
        sorted_slot=d_slot,
        pad_index=d_pad,
        seg_starts=d_starts.to(torch.int32),
        seg_slots=d_slots.to(torch.int32),
        num_tokens=host.numel(),
        seg_starts_list=tuple(seg_starts.tolist()),
        seg_slots_list=tuple(seg_slots.tolist()),
        max_seg_len=max_len,
        slot_span=span,
        in_order=n_act == host.numel() and bool(torch.equal(sorted_tokens, torch.arange(n_act))),
    )
