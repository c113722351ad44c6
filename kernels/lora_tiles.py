"""Tuned tiles of the one-launch LoRA kernels (triton_lowrank_rows.py), per module shape.

    table = TileTable.for_device("NVIDIA H200")        # $PEFTSERVE_LORA_TILES, else tuned/
    shrink, expand = table.pick(d_in, slice_sizes, r_max, n_tokens)   # None: the defaults

The fastest tile differs by module: on the H200 at Llama-3.1-8B's shape, gate_up's pair of
kernels is fastest with 256 output columns a program, qkv's and down's with 64
(bench/results/gpu_2026-12-04b). As vLLM ships tuned LoRA kernel configs per GPU, a table per
device, written from gpu.sh's tile sweep (`python -m bench.gpu_report --tuned-tiles`), gives
each (kernel, module shape, max rank) its tile at the swept batch nearest the step's; a shape it
does not list keeps the kernels' defaults. Pure Python: read when the backend is chosen, before
Triton is imported.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TUNED_DIR = Path(__file__).parent / "tuned"
ENV_LORA_TILES = "PEFTSERVE_LORA_TILES"
KERNELS = ("shrink", "expand")
WARPS = (1, 2, 4, 8, 16)


class Tiles(NamedTuple):
    """One kernel's launch parameters."""

    block: int  # expand: output columns a program; shrink: input columns a step of its loop
    warps: int
    rank_chunk: int  # ranks a step of a loop over each slot's own rank; 0: one tile of them all
    programs: int = 0  # shrink: the programs a launch aims at (its splits); expand: unused
    rank_grid: int = 0  # shrink: ranks a program, its slot's spread over programs; 0: all


# (kernel, in_features, output slice sizes, R_max) -> [(swept batch, tiles)], batches ascending
Key = tuple[str, int, tuple[int, ...], int]


def _pow2(v: object) -> bool:
    return type(v) is int and v > 0 and v & (v - 1) == 0


def _entry(raw: object, where: str) -> tuple[Key, int, Tiles]:
    """One entry of a table file, checked: a bad tile would fail a kernel at its first launch,
    mid-service; here it fails the server's start."""
    fields = ("kernel", "in", "slices", "r_max", "batch", "block", "warps", "rank_chunk")
    if not isinstance(raw, dict) or any(k not in raw for k in fields):
        raise ValueError(f"{where}: an entry needs {', '.join(fields)}")
    kernel, d_in, slices, r_max, batch = (raw[k] for k in fields[:5])
    tiles = Tiles(raw["block"], raw["warps"], raw["rank_chunk"], raw.get("programs", 0),
                  raw.get("rank_grid", 0))
    ints = (d_in, r_max, batch, tiles.programs, tiles.rank_grid)
    if (
        kernel not in KERNELS
        or not all(type(v) is int and v >= 0 for v in ints)
        or min(d_in, r_max, batch) < 1
        or not isinstance(slices, list)
        or not slices
        or not all(type(s) is int and s > 0 for s in slices)
    ):
        raise ValueError(f"{where}: kernel one of {KERNELS}; in, r_max, batch positive; "
                         f"slices a list of positive sizes, got {raw}")  # fmt: skip
    if not (16 <= tiles.block <= 1024 and _pow2(tiles.block)) or tiles.warps not in WARPS:
        raise ValueError(f"{where}: block a power of two in [16, 1024] and warps in {WARPS}, "
                         f"got {tiles.block} and {tiles.warps}")  # fmt: skip
    if tiles.rank_chunk and not _pow2(tiles.rank_chunk):
        raise ValueError(f"{where}: rank_chunk 0 or a power of two, got {tiles.rank_chunk}")
    if kernel == "shrink" and tiles.programs < 1:
        raise ValueError(f"{where}: a shrink entry needs programs >= 1")
    if tiles.rank_grid and (kernel != "shrink" or not _pow2(tiles.rank_grid)):
        raise ValueError(f"{where}: rank_grid 0, or a power of two for the shrink, got "
                         f"{tiles.rank_grid}")  # fmt: skip
    return (kernel, d_in, tuple(slices), r_max), batch, tiles


@dataclass
class TileTable:
    """Tuned tiles by (kernel, module shape, max rank), each at the batches it was swept at."""

    entries: dict[Key, list[tuple[int, Tiles]]] = field(default_factory=dict)
    source: str = "the kernels' defaults"
    _picked: dict[tuple, tuple[Tiles | None, Tiles | None]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TileTable:
        """A table from its JSON file ({"entries": [...]}, as gpu_report --tuned-tiles writes)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"LoRA tile table {path}: {e}") from None
        raw = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            raise ValueError(f"LoRA tile table {path}: a JSON object with a list of entries")
        return cls.from_entries(raw, str(path))

    @classmethod
    def from_entries(cls, raw: list, source: str = "given entries") -> TileTable:
        """A table from its entries: each {"kernel", "in", "slices", "r_max", "batch",
        "block", "warps", "rank_chunk"[, "programs", "rank_grid"]} (Tiles' fields); ValueError
        naming the first bad one."""
        table = cls(source=source)
        for i, item in enumerate(raw):
            where = f"LoRA tile table {source}, entry {i}"
            key, batch, tiles = _entry(item, where)
            rows = table.entries.setdefault(key, [])
            if any(b == batch for b, _ in rows):
                raise ValueError(f"{where}: {key} at batch {batch} twice")
            rows.append((batch, tiles))
            rows.sort()
        return table

    @classmethod
    def for_device(cls, device_name: str | None, env: dict[str, str]) -> TileTable:
        """The table at env[ENV_LORA_TILES] (a path; empty: none), else the one shipped for
        `device_name` (tuned/<its name, non-alphanumerics as _>.json), else an empty one."""
        if ENV_LORA_TILES in env:
            path = env[ENV_LORA_TILES]
            return cls.load(Path(path)) if path else cls(source=f"none ({ENV_LORA_TILES}=)")
        shipped = TUNED_DIR / f"{device_file(device_name)}.json" if device_name else None
        return cls.load(shipped) if shipped is not None and shipped.is_file() else cls()

    def pick(self, d_in: int, slices: tuple[int, ...], r_max: int, n_tokens: int
             ) -> tuple[Tiles | None, Tiles | None]:  # fmt: skip
        """(shrink, expand) tiles for a launch of n_tokens rows: each kernel's entry at the
        swept batch nearest n_tokens (by ratio; a tie to the larger); None where the table
        lists none (the kernel's defaults)."""
        if not self.entries:
            return None, None
        key = (d_in, slices, r_max, n_tokens)
        got = self._picked.get(key)
        if got is None:
            got = self._picked[key] = (
                self._nearest(("shrink", d_in, slices, r_max), n_tokens),
                self._nearest(("expand", d_in, slices, r_max), n_tokens),
            )
        return got

    def _nearest(self, key: Key, n_tokens: int) -> Tiles | None:
        rows = self.entries.get(key)
        if not rows:
            return None
        at = math.log(max(1, n_tokens))
        return min(rows, key=lambda r: (abs(math.log(r[0]) - at), -r[0]))[1]


def device_file(device_name: str) -> str:
    """A device's table name: "NVIDIA H200" -> "NVIDIA_H200"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
