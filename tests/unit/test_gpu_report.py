"""bench/gpu_report.py: each must-show read from where gpu.sh writes it, met or not, and what a
failed or unfinished run left out counted against it."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_report
from peftserve.kernels.lora_tiles import Tiles, TileTable


def write(out: Path, name: str, data: dict) -> None:
    (out / name).write_text(json.dumps(data))


def engine_json(step_over_floor: float, vs_generate: float, qv: float, heavy: float) -> dict:
    return {
        "decode_floor": {b: {"step_over_floor": step_over_floor} for b in ("1", "8", "32", "64")},
        "throughput": {"speedup_vs_hf_batch32": vs_generate},
        "adapters": {"lora-qv": {"vs_base": qv}, "lora-heavy": {"vs_base": heavy}},
    }


def row(line_start: str, text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(line_start))


def test_goals_met_and_not(tmp_path):
    write(tmp_path, "gpu_engine_8b.json", engine_json(1.2, 3.5, 0.95, 0.65))
    small = engine_json(2.6, 6.0, 0.85, 0.5)
    small["decode_floor"]["8"]["step_over_floor"] = 2.4
    small["cold_register_to_first_token_ms"] = {
        "p50": 38.0, "register_p50": 9.0, "first_request_p50": 29.0,
        "resident_first_token_p50": 21.5, "base_first_token_p50": 14.0,
    }  # fmt: skip
    write(tmp_path, "gpu_engine.json", small)
    (tmp_path / "steps.log").write_text(
        "== engine_bench_8b: exit 0 in 100 s\n== engine_cuda_tests: exit 1 in 60 s\n"
        "== kernel_tests: exit 124 in 55 s\n== kernel_tests: exit 0 in 40 s\n"
        "== native_kernels: skipped, 3 s of the run's 470 s left\n"
    )
    text, unmet = gpu_report.report(tmp_path)
    assert row("| Llama-3.1-8B: decode step / floor, batch 1 |", text).endswith("| yes |")
    assert row("| Llama-3.1-8B: 32 all-linear", text) == (
        "| Llama-3.1-8B: 32 all-linear LoRAs / base tok/s | 0.65 | >= 0.7 | NO |"
    )
    assert row("| SmolLM2: decode step / floor, batch 1 |", text).endswith("| NO |")
    assert row("| SmolLM2: decode step / floor, batch 8 |", text).endswith("| yes |")
    assert row("| SmolLM2: cold", text).endswith("| 38 | <= 40 | yes |")
    assert row("| tests: engine_cuda_tests", text).endswith("| exit 1 | exit 0 | NO |")
    assert row("| tests: kernel_tests", text).endswith("| exit 0 | exit 0 | yes |")  # the last
    assert row("| tests: native_kernels", text).endswith("| skipped | exit 0 | NO |")
    # SmolLM2 batch 1 and 32, 8B all-linear, engine tests, native kernels
    assert unmet == 5
    assert ("- cold start p50 parts, ms: registration 9, slot write and other first-use costs "
            "7.5, prefill with the adapter 21.5 (the base model's 14)") in text  # fmt: skip
    assert "under cProfile" not in text
    small["cold_register_to_first_token_ms"]["slot_write_p50"] = 6.25
    small["cold_register_to_first_token_ms"]["graph_capture_ms"] = [310.5, 0.0, 0.0]
    write(tmp_path, "gpu_engine.json", small)
    text, _ = gpu_report.report(tmp_path)
    assert ("slot write and other first-use costs 7.5 (the slot write alone, synchronized, "
            "6.25; graph captures inside the first requests, ms: 310, 0, 0), prefill") in text
    small["cold_profile"] = {"total_ms": 50.0, "by_cumulative": [
        {"function": "server/engine/engine.py:399 generate", "calls": 1, "own_ms": 0.1,
         "cumulative_ms": 30.5}], "by_own": [
        {"function": "slots.py:206 write_lora", "calls": 1, "own_ms": 5.4,
         "cumulative_ms": 21.9}]}  # fmt: skip
    write(tmp_path, "gpu_engine.json", small)
    text, _ = gpu_report.report(tmp_path)
    assert ("- one cold start under cProfile (50 ms), the functions by ms in them: "
            "server/engine/engine.py:399 generate 30.5 x1") in text
    assert "the functions by ms their own: slots.py:206 write_lora 5.4 x1" in text


def test_a_run_that_wrote_nothing_meets_nothing(tmp_path):
    text, unmet = gpu_report.report(tmp_path)
    assert unmet == len(gpu_report.GOALS) + len(gpu_report.TEST_STEPS)
    assert "decode_kernels_cuda.json: missing" in text
    assert "- cold start: no breakdown in gpu_engine.json" in text
    assert row("| SmolLM2: cold", text) == (
        "| SmolLM2: cold register -> first token p50, ms | missing | <= 40 | NO |"
    )


def test_kernel_rows_give_each_method_and_the_fastest(tmp_path):
    write(tmp_path, "decode_kernels_cuda.json", {"device_copy_gbs": 3900.0, "rows": [
        {"op": "lora", "shape": "llama-3.1-8b", "module": "qkv", "batch": 8,
         "graph_ms": {"rows_one_launch": 0.02, "segments": 0.05},
         "gbs_graph": {"rows_one_launch": 1500.0, "segments": 600.0}, "max_abs_diff": 0.0},
        {"op": "attention", "shape": "smollm2", "batch": 8, "graph_ms": {}, "gbs_graph": {}},
    ]})  # fmt: skip
    write(tmp_path, "decode_fused_ops_cuda.json", {"device_copy_gbs": 3900.0, "rows": [
        {"op": "fused", "shape": "smollm2", "module": "silu_and_mul", "batch": 1,
         "inductor_first_call_s": 4.5, "graph_ms": {"triton": 0.003, "inductor": 0.004},
         "gbs_graph": {"triton": 90.0, "inductor": 70.0}},
    ]})  # fmt: skip
    text, _ = gpu_report.report(tmp_path)
    assert "device copy 3.9e+03 GB/s" in text
    lora, rest = text.split("segment kernels:")[1].split("Paged decode attention")
    assert ("  - llama-3.1-8b qkv batch 8: GB/s rows_one_launch 1.5e+03, segments 600; "
            "fastest: rows_one_launch; max |diff| between the methods 0") in lora
    assert "smollm2" not in lora
    attention = rest.split("Fused")[0]
    assert "  - smollm2 batch 8: GB/s ; no timings; max |diff| between the methods missing" in (
        attention
    )
    assert "qkv" not in attention
    assert ("  - smollm2 silu_and_mul batch 1: GB/s triton 90, inductor 70; fastest: triton; "
            "Inductor's first call 4.5 s; max |diff|") in rest.split("Fused")[1]  # fmt: skip


def test_lora_tiles_rank_the_tiles_by_their_total_time(tmp_path):
    text, _ = gpu_report.report(tmp_path)
    assert "by tile" not in text  # an opt-in step: no file, no section

    def tile_row(tile, module, batch, ms, gbs):
        return {"op": "lora_tiles", "tiles": tile, "shape": "llama-3.1-8b", "module": module,
                "batch": batch, "graph_ms": {"rows_one_launch": ms, "segments": 1.0},
                "gbs_graph": {"rows_one_launch": gbs, "segments": 1.0}, "max_abs_diff": 0.01,
                "stage_graph_ms": {"shrink": ms / 4, "expand": ms / 2}}  # fmt: skip

    write(tmp_path, "decode_lora_tiles_cuda.json", {"rows": [
        tile_row("64:4:128:4", "qkv", 32, 0.024, 548.0),
        tile_row("64:4:128:4:16", "qkv", 32, 0.012, 1096.0),
        tile_row("64:4:128:4", "down", 32, 0.021, 1100.0),
        tile_row("64:4:128:4:16", "down", 32, 0.025, 924.0),
        tile_row("64:4:128:4", "o", 8, 0.5, 1.0),  # a cell only one tile ran: not in totals
        {"op": "lora_tiles", "tiles": "64:4:128:4:0:64:4", "shape": "llama-3.1-8b", "batch": 8,
         "error": "CompilationError: at 12:4"},  # a tile that failed: named, not ranked
        # the fastest, but its sums are not the segment kernels': named, not ranked
        {**tile_row("32:2:64:2", "qkv", 32, 0.001, 9e3), "max_abs_diff": 3.5},
    ]})  # fmt: skip
    text, _ = gpu_report.report(tmp_path)
    tiles = text.split("by tile")[1]
    assert "- FAILED 64:4:128:4:0:64:4 at batch 8: CompilationError: at 12:4" in tiles
    assert ("- WRONG SUMS 32:2:64:2 qkv at batch 32: max |diff| 3.5 against the segment "
            "kernels (left out of the table)") in tiles
    assert ("- total ms over the 2 cells every tile ran, least first: 64:4:128:4:16 0.037, "
            "64:4:128:4 0.045") in tiles
    assert ("  - llama-3.1-8b qkv batch 32: GB/s 64:4:128:4 548, 64:4:128:4:16 1.1e+03; "
            "fastest: 64:4:128:4:16") in tiles
    assert "  - llama-3.1-8b down batch 32: GB/s 64:4:128:4 1.1e+03, 64:4:128:4:16 924; " \
        "fastest: 64:4:128:4" in tiles
    assert gpu_report.best_tile(tmp_path) == "64:4:128:4:16"
    assert ("- llama-3.1-8b batch 32, a layer's LoRA pairs: 45 us under the defaults "
            "(64:4:128:4), 33 us each at its fastest (qkv 24 -> 12 64:4:128:4:16, down 21 -> 21 "
            "64:4:128:4)") in tiles
    assert ("- the same cells, each kernel timed apart (shrink / expand ms): "
            "64:4:128:4:16 0.00925 / 0.0185, 64:4:128:4 0.0112 / 0.0225") in tiles
    assert "under 64:4:128:4:16" not in tiles  # the engine step did not run
    write(tmp_path, "gpu_engine_8b_tiles.json", {"lora_tiles": "64:4:128:4:16", "adapters": {
        "lora-qv": {"vs_base": 0.93}, "lora-heavy": {"vs_base": 0.71}}})  # fmt: skip
    text, _ = gpu_report.report(tmp_path)
    assert ("- Llama-3.1-8B's adapters section under 64:4:128:4:16 (gpu_engine_8b_tiles.json), "
            "tok/s vs base: lora-qv 0.93, lora-heavy 0.71; decode step ms at batch 32: "
            "base missing") in text
    assert "beside its base matmul" not in text  # lora_overlap_engine did not run
    for mode, what in (("delta", "whole delta"), ("shrink", "shrink")):
        write(tmp_path, f"gpu_engine_8b_overlap_{mode}.json", {"lora_tiles": "default",
            "lora_overlap": mode, "adapters": {
            "base": {"vs_base": 1.0, "decode_step_ms": 5.2},
            "lora-qv": {"vs_base": 0.91, "decode_step_ms": 5.7},
            "lora-heavy": {"vs_base": 0.69, "decode_step_ms": 7.9}}})  # fmt: skip
        text, _ = gpu_report.report(tmp_path)
        assert (f"- Llama-3.1-8B's adapters section under default, each LoRA's {what} beside "
                f"its base matmul (gpu_engine_8b_overlap_{mode}.json), tok/s vs base: lora-qv "
                "0.91, lora-heavy 0.69; decode step ms at batch 32: base 5.2, lora-qv 5.7, "
                "lora-heavy 7.9") in text


def test_best_tile_is_empty_without_the_tiles_step(tmp_path):
    assert gpu_report.best_tile(tmp_path) == ""


def test_the_machine_and_start_up_times(tmp_path):
    (tmp_path / "gpu_env.log").write_text("NVIDIA H200 {'torch': '2.11.0'}\n")
    write(tmp_path, "gpu_engine.json", {"engine_start_s": 12.5, "cuda_graph_capture_s": 3.25,
                                        "adapters_written_and_registered_s": 7.0})  # fmt: skip
    text, _ = gpu_report.report(tmp_path)
    assert "- machine: NVIDIA H200 {'torch': '2.11.0'}" in text
    assert ("- SmolLM2: engine start 12.5 s, of it graph capture 3.25 s, adapters written and "
            "registered 7 s") in text  # fmt: skip
    assert ("- Llama-3.1-8B: engine start missing, of it graph capture missing, adapters "
            "written and registered missing") in text  # fmt: skip


def test_a_failed_section_is_named(tmp_path):
    data = engine_json(1.2, 3.5, 0.95, 0.65) | {"errors": {"floor": "RuntimeError: broke"}}
    write(tmp_path, "gpu_engine_8b.json", data)
    text, _ = gpu_report.report(tmp_path)
    assert "- Llama-3.1-8B: section floor failed: RuntimeError: broke" in text
    assert "SmolLM2: section" not in text


def test_the_overlaps_are_set_against_the_step_without_them(tmp_path):
    data = engine_json(1.2, 3.5, 0.95, 0.65)
    data["decode_floor"]["1"] |= {"decode_step_ms": 4.21, "no_ahead_decode_step_ms": 4.61,
                                  "no_overlap_decode_step_ms": 4.73}  # fmt: skip
    data["decode_floor"]["32"] |= {"decode_step_ms": 5.02}  # the run without graphs: no pair
    write(tmp_path, "gpu_engine_8b.json", data)
    text, _ = gpu_report.report(tmp_path)
    line = row("- Llama-3.1-8B, decode step ms, as served / not scheduled ahead / neither", text)
    assert "batch 1: 4.21 / 4.61 / 4.73;" in line
    assert "batch 32: 5.02 / missing / missing" in line
    assert row("- SmolLM2, decode step ms", text).endswith("overlapped: missing")


def test_tuned_tiles_take_each_kernels_fastest_per_module_and_batch(tmp_path):
    """--tuned-tiles: a LoRA tile table (kernels/lora_tiles.py) from the sweep, each kernel's
    tile chosen by its own time, so the shrink and the expand of one module may come from
    different tiles; a server reads it back as it is."""
    assert gpu_report.tuned_tiles(tmp_path)["entries"] == []
    qkv = {"module": "qkv", "d_in": 4096, "slices": [4096, 1024, 1024], "r_max": 64}
    down = {"module": "down", "d_in": 14336, "slices": [4096], "r_max": 64}

    def row(tile, module, batch, shrink, expand, pair):
        return {"op": "lora_tiles", "tiles": tile, "shape": "llama-3.1-8b", **module,
                "batch": batch, "stage_graph_ms": {"shrink": shrink, "expand": expand},
                "graph_ms": {"rows_one_launch": pair}, "max_abs_diff": 0.0078}  # fmt: skip

    # qkv: the second tile's shrink is the faster alone, the first tile's pair the faster
    # (its expand sums fewer splits): the pair decides, both kernels from one tile
    write(tmp_path, "decode_lora_tiles_cuda.json", {"device": "NVIDIA H200", "rows": [
        row("64:4:128:4", qkv, 32, 0.010, 0.014, 0.025),
        row("256:8:64:2:32:1024:16", qkv, 32, 0.008, 0.019, 0.028),
        row("64:4:128:4", down, 8, 0.004, 0.005, 0.010),
        row("256:8:64:2:32:1024:16", down, 8, 0.003, 0.004, 0.008),
        # faster still, but wrong (or NaN) sums against the segment kernels: never taken
        {**row("32:2:64:2", down, 8, 0.001, 0.001, 0.002), "max_abs_diff": 0.5},
        {**row("32:2:64:4", qkv, 32, 0.001, 0.001, 0.002), "max_abs_diff": float("nan")},
        {"op": "lora_tiles", "tiles": "64:4:128:4:3", "batch": 8, "error": "no compile"},
        {"op": "lora", "module": "o", "batch": 8},  # the plain kernel rows: not tiles
    ]})  # fmt: skip
    table = gpu_report.tuned_tiles(tmp_path)
    assert table["device"] == "NVIDIA H200"
    got = {(e["kernel"], e["in"], e["batch"]): (e["tiles"], e["block"], e["warps"],
                                                e["rank_chunk"], e.get("programs"),
                                                e.get("rank_grid"), e["graph_ms"])
           for e in table["entries"]}  # fmt: skip
    assert got == {
        ("shrink", 4096, 32): ("64:4:128:4", 128, 4, 0, 256, 0, 0.025),  # left out: defaults
        ("expand", 4096, 32): ("64:4:128:4", 64, 4, 0, None, None, 0.025),
        ("shrink", 14336, 8): ("256:8:64:2:32:1024:16", 64, 2, 32, 1024, 16, 0.008),
        ("expand", 14336, 8): ("256:8:64:2:32:1024:16", 256, 8, 32, None, None, 0.008),
    }
    tiles = TileTable.from_entries(table["entries"])
    assert tiles.pick(14336, (4096,), 64, 8) == (Tiles(64, 2, 32, 1024, 16), Tiles(256, 8, 32))
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(table))
    assert TileTable.load(path).entries == tiles.entries
    write(tmp_path, "gpu_engine_8b_tiles.json", {"lora_tiles": "default",
                                                 "lora_tile_table": str(path), "adapters": {
        "lora-qv": {"vs_base": 0.93}, "lora-heavy": {"vs_base": 0.71}}})  # fmt: skip
    write(tmp_path, "decode_lora_tiles_cuda.json", {"rows": [
        {**row("64:4:128:4", qkv, 32, 0.01, 0.01, 0.02),
         "gbs_graph": {"rows_one_launch": 100.0}}]})  # fmt: skip
    text, _ = gpu_report.report(tmp_path)
    assert f"adapters section under {path} (gpu_engine_8b_tiles.json)" in text


def test_the_lora_work_beside_each_matmul_is_reported_where_timed(tmp_path):
    """gpu.sh's opt-in overlap_kernels step: what each module's LoRA work adds to its matmul
    after it, with its shrink beside it, and with its whole delta beside it."""
    text, _ = gpu_report.report(tmp_path)
    assert "their work beside it" not in text  # the step did not run
    write(tmp_path, "decode_overlap_cuda.json", {"device_copy_gbs": 4000, "rows": [
        {"op": "overlap", "shape": "llama-3.1-8b", "module": "gate_up", "batch": 32,
         "graph_ms": {"matmul_alone": 0.060, "lora_after": 0.105, "shrink_beside": 0.092,
                      "delta_beside": 0.0655},
         "gbs_graph": {"matmul_alone": 3900.0}, "max_abs_diff": 0.0}]})  # fmt: skip
    text, _ = gpu_report.report(tmp_path)
    assert ("  - llama-3.1-8b gate_up batch 32: GB/s matmul_alone 3.9e+03; matmul alone 60 us, "
            "the LoRA adds (us): lora_after 45, shrink_beside 32, delta_beside 5.5; max |diff| "
            "between the methods 0") in text
