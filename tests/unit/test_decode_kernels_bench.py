"""bench/decode_kernels.py's dry run on the CPU (`--device cpu`, the Triton kernels in the
interpreter, fp16, the "tiny" shape): every op and method it times on the GPU runs, the methods
of an op agree with each other, and the JSON holds what bench/gpu_report.py reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_every_method_and_they_agree(tmp_path):
    out = tmp_path / "decode_kernels.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "bench/decode_kernels.py", "--device", "cpu", "--dtype", "float16",
         "--shapes", "tiny", "--batches", "2", "--reps", "1",
         "--ops", "attention,lora,fused,overlap", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["setup"]["dtype"] == "float16" and list(result["setup"]["shapes"]) == ["tiny"]
    assert result["device_copy_gbs"] > 0
    methods = {
        ("attention", None): {"triton_paged", "triton_paged_graph_width", "gather_sdpa"},
        # each with the expand's ranks read by slot, as before TOKEN_RANKS
        **{("lora", m): {"rows_one_launch", "segments", "rows_rank_by_slot"}
           for m in ("o", "gate_up", "down")},
        # qkv's slices differ in width under GQA: also the expand's grid before FLAT_TILES
        ("lora", "qkv"): {"rows_one_launch", "segments", "rows_widest_grid", "rows_rank_by_slot"},
        **{("fused", m): {"triton", "inductor", "torch"}
           for m in ("add_rms_norm", "rotary_and_cache", "silu_and_mul")},
        # each module's matmul with its LoRA after it, or part (all) of it beside it
        **{("overlap", m): {"matmul_alone", "lora_after", "shrink_beside", "delta_beside"}
           for m in ("qkv", "o", "gate_up", "down")},
    }  # fmt: skip
    rows = {(r["op"], r.get("module")): r for r in result["rows"]}
    assert rows.keys() == methods.keys()
    for key, row in rows.items():
        assert row["shape"] == "tiny" and row["batch"] == 2 and row["bytes"] > 0
        assert set(row["ms"]) == methods[key] and all(t > 0 for t in row["ms"].values()), key
        assert all(t is None for t in row["graph_ms"].values()), key  # no graphs off CUDA
        # fp16 outputs of order 0.1-1: the methods agree to its rounding (the interpreter's
        # bf16 dot is what made them differ by 1e10: the reason the dry run is fp16)
        assert row["max_abs_diff"] < 1e-2, (key, row["max_abs_diff"])
        if key[0] == "fused":
            assert row["max_abs_diff_inductor"] < 1e-2, key
            assert row["inductor_first_call_s"] > 0


def test_lora_tiles_time_each_tile(tmp_path):
    """--lora-tiles: the one-launch LoRA kernels under each tile configuration, each agreeing
    with the segment kernels (a tile that computed something else would show here)."""
    out = tmp_path / "tiles.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # the third: shrink programs of 4 ranks each; the last cannot compile (a rank chunk of 3):
    # its row says so and the others still run
    tiles = ["64:4:128:4", "128:8:64:2:4", "64:4:128:4:0:64:4", "64:4:128:4:3"]
    done = subprocess.run(
        [sys.executable, "bench/decode_kernels.py", "--device", "cpu", "--dtype", "float16",
         "--shapes", "tiny", "--batches", "3", "--reps", "1", "--lora-tiles", *tiles,
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if "error" in r]
    assert [(r["tiles"], r["batch"]) for r in failed] == [("64:4:128:4:3", 3)]
    assert "tile 64:4:128:4:3 at tiny batch 3 failed" in done.stderr
    rows = [r for r in rows if "error" not in r]
    assert {(r["tiles"], r["module"]) for r in rows} == {
        (t, m) for t in tiles[:-1] for m in ("qkv", "o", "gate_up", "down")
    }
    assert all(r["op"] == "lora_tiles" and r["max_abs_diff"] < 1e-2 for r in rows)
    # each row names its module's shape, as gpu_report --tuned-tiles keys a tile table by it
    shapes = {r["module"]: (r["d_in"], tuple(r["slices"]), r["r_max"]) for r in rows}
    assert len(shapes["qkv"][1]) == 3 and len(shapes["gate_up"][1]) == 2
    assert shapes["o"][0] == shapes["qkv"][1][0] and shapes["down"][1] == shapes["o"][1]
    # each kernel timed apart too (graph times need CUDA: None here)
    assert all(set(r["stage_ms"]) == {"shrink", "expand"} and min(r["stage_ms"].values()) > 0
               for r in rows)  # fmt: skip


def test_a_tile_leaving_fields_out_gets_the_kernels_defaults():
    from bench import decode_kernels
    from peftserve.kernels import triton_lowrank_rows as rows_module

    defaults = (rows_module.RANK_CHUNK, rows_module.SHRINK_PROGRAMS,
                rows_module.SHRINK_RANK_GRID)  # fmt: skip
    assert decode_kernels.LEFT_OUT == defaults
    # the sweep's first tile is the kernels' defaults (gpu_report compares the others with it)
    assert decode_kernels.tile_values(decode_kernels.SWEEP_TILES[0]) == [
        getattr(rows_module, name) for name in decode_kernels.TILE_NAMES]
    before = decode_kernels.set_tiles("32:2:64:2:8:1024:16")
    try:
        assert rows_module.SHRINK_RANK_GRID == 16
        assert decode_kernels.set_tiles("64:4:128:4") == "32:2:64:2:8:1024:16"
        assert (rows_module.RANK_CHUNK, rows_module.SHRINK_PROGRAMS,
                rows_module.SHRINK_RANK_GRID) == decode_kernels.LEFT_OUT  # fmt: skip
    finally:
        decode_kernels.set_tiles(before)
    assert decode_kernels.kernel_tiles("64:4:128:4:0:1024:16")["shrink"] == {
        "block": 128, "warps": 4, "rank_chunk": 0, "programs": 1024, "rank_grid": 16}


def test_the_lora_bytes_count_what_the_kernels_read(monkeypatch):
    """The bytes a LoRA row's GB/s is over: each slot in use, A of every slice (q, k and v
    each have their own) and B's rows, at the slot's rank: counted here from the tensors."""
    import torch

    from bench import decode_kernels as dk

    monkeypatch.setattr(dk, "DEV", "cpu")
    monkeypatch.setattr(dk, "DTYPE", torch.float32)
    token_slot = dk.lora_token_slots(8)
    for d_in, slices in dk.lora_modules("tiny").values():
        rank, A, B, _, _ = dk.lora_weights(d_in, slices, 8)
        read = sum(A[:, s, : int(rank[0, s])].numel() + B[s, :, : int(rank[0, s])].numel()
                   for s in set(token_slot.tolist()))  # fmt: skip
        assert dk.lora_weight_elements(token_slot, d_in, slices) == read, slices
