"""kernels/lora_tiles.py: the tuned tiles' table, its file checks, and which entry a launch
gets (the kernels running the tiles: tests/kernels/test_triton_lowrank_rows.py)."""

from __future__ import annotations

import json

import pytest

from peftserve.kernels import lora_tiles
from peftserve.kernels.lora_tiles import ENV_LORA_TILES, Tiles, TileTable, device_file

QKV = [4096, 1024, 1024]


def entry(**kw):
    base = {"kernel": "expand", "in": 4096, "slices": QKV, "r_max": 64, "batch": 32,
            "block": 64, "warps": 4, "rank_chunk": 0}  # fmt: skip
    return {**base, **kw}


def test_pick_takes_each_kernels_entry_at_the_nearest_swept_batch():
    table = TileTable.from_entries([
        entry(batch=8, block=128), entry(batch=32, block=256, warps=8),
        entry(kernel="shrink", batch=32, block=128, programs=1024, rank_grid=16),
    ])  # fmt: skip
    expand_at = {n: table.pick(4096, tuple(QKV), 64, n)[1] for n in (1, 8, 15, 16, 17, 64)}
    assert expand_at[1] == expand_at[8] == expand_at[15] == Tiles(128, 4, 0)
    # 16 lies as far from 8 as from 32 (by ratio): the larger batch's
    assert expand_at[16] == expand_at[17] == expand_at[64] == Tiles(256, 8, 0)
    assert table.pick(4096, tuple(QKV), 64, 1)[0] == Tiles(128, 4, 0, 1024, 16)  # any n
    # another module, another max rank: not listed, the kernels' defaults
    assert table.pick(4096, (4096,), 64, 32) == (None, None)
    assert table.pick(4096, tuple(QKV), 16, 32) == (None, None)
    assert TileTable().pick(4096, tuple(QKV), 64, 32) == (None, None)


@pytest.mark.parametrize("bad, message", [
    (entry(kernel="gemm"), "kernel one of"),
    (entry(slices=[]), "slices a list"),
    (entry(slices=[64, "64"]), "slices a list"),
    (entry(batch=0), "batch positive"),
    (entry(block=48), "block a power of two"),
    (entry(block=2048), "block a power of two"),
    (entry(warps=3), "warps in"),
    (entry(rank_chunk=12), "rank_chunk 0 or a power of two"),
    (entry(kernel="shrink"), "needs programs"),
    (entry(kernel="shrink", programs=512, rank_grid=12), "rank_grid 0, or a power of two"),
    (entry(rank_grid=16), "rank_grid 0, or a power of two for the shrink"),
    ({"kernel": "expand"}, "an entry needs"),
    ("64:4:128:4", "an entry needs"),
])  # fmt: skip
def test_a_bad_entry_is_refused_naming_it(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        TileTable.from_entries([entry(), bad])
    assert "entry 1" in str(e.value)


def test_the_same_module_and_batch_twice_is_refused():
    with pytest.raises(ValueError, match="at batch 32 twice"):
        TileTable.from_entries([entry(), entry(block=128)])


def test_a_table_file_is_read_and_a_bad_one_refused(tmp_path):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "entries": [entry(block=256)]}))
    table = TileTable.load(path)
    assert table.source == str(path)
    assert table.pick(4096, tuple(QKV), 64, 32)[1] == Tiles(256, 4, 0)
    for text in ("not json", json.dumps([entry()]), json.dumps({"entries": {}})):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"LoRA tile table {path}"):
            TileTable.load(path)
    with pytest.raises(ValueError, match="LoRA tile table"):
        TileTable.load(tmp_path / "missing.json")


def test_the_device_table_comes_from_the_environment_else_the_shipped_one(tmp_path,
                                                                          monkeypatch):  # fmt: skip
    assert device_file("NVIDIA H200") == "NVIDIA_H200"
    assert device_file("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100_SXM4_80GB"
    monkeypatch.setattr(lora_tiles, "TUNED_DIR", tmp_path)
    assert TileTable.for_device("NVIDIA H200", {}).entries == {}  # none shipped
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps({"entries": [entry(block=128)]}))
    shipped = TileTable.for_device("NVIDIA H200", {})
    assert shipped.source == str(tmp_path / "NVIDIA_H200.json")
    assert shipped.pick(4096, tuple(QKV), 64, 32)[1] == Tiles(128, 4, 0)
    assert TileTable.for_device("NVIDIA H100", {}).entries == {}
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"entries": [entry(block=32)]}))
    assert TileTable.for_device("NVIDIA H200", {ENV_LORA_TILES: str(own)}).pick(
        4096, tuple(QKV), 64, 32)[1] == Tiles(32, 4, 0)  # fmt: skip
    off = TileTable.for_device("NVIDIA H200", {ENV_LORA_TILES: ""})
    assert off.entries == {} and ENV_LORA_TILES in off.source
    with pytest.raises(ValueError, match="missing.json"):
        TileTable.for_device("NVIDIA H200", {ENV_LORA_TILES: str(tmp_path / "missing.json")})
