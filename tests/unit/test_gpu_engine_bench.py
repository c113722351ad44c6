"""bench/gpu_engine.py's dry run on the CPU (`--device cpu`, random weights of the "tiny" shape,
SmolLM2's tokenizer, one timed run per configuration): every section bench/gpu.sh asks of it
runs, on the real engine and transformers, and writes the numbers bench/gpu_report.py reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_report
from peftserve.models.loader import resolve_model_dir

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # the real model's tokenizer


def test_dry_run_writes_every_goal(tmp_path):
    out = tmp_path / "gpu_engine.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_engine", "--device", "cpu", "--shape", "tiny",
         "--model-dir", str(resolve_model_dir("default")), "--weights-dir", str(tmp_path / "w"),
         "--sections", "throughput,floor,adapters,cold,profile", "--repeat", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["requests"] == 32
    assert result["weights"]["params"] > 0 and result["cuda_graph_capture_s"] is None
    # what the report reads for the SmolLM2 shape's goals, all present and positive
    small = [g for g in gpu_report.GOALS if g.file == "gpu_engine.json"]
    assert small
    for goal in small:
        value = gpu_report.dig(result, goal.path)
        assert value is not None and value > 0, goal.what
    assert set(result["decode_floor"]) == {"1", "8", "32", "64"}
    assert set(result["adapters"]) == {"base", "lora-qv", "lora-heavy"}
    assert result["adapters"]["base"]["vs_base"] == 1.0
    for config, a in result["adapters"].items():  # each run's steps by phase
        phases = a["phases"]
        by_batch = phases["decode_by_batch"]
        assert phases["prefill"][0] >= 1 and phases["prefill"][1] > 0, config
        assert phases["decode"][0] == sum(n for n, _ in by_batch.values()) > 0, config
        assert phases["decode"][1] == pytest.approx(sum(ms for _, ms in by_batch.values()))
        # decode rows: at most every output token but each request's first (a prefill's)
        rows = sum(int(b) * n for b, (n, _) in by_batch.items())
        assert 0 < rows <= result["output_tokens"] - result["requests"], config
    cold = result["cold_register_to_first_token_ms"]
    assert cold["register_p50"] < cold["p50"] and cold["base_first_token_p50"] > 0
    assert 0 < cold["slot_write_p50"] < cold["first_request_p50"]  # timed inside the request
    assert cold["graph_capture_ms"] == [0.0] * len(cold["all"])  # no graphs on the CPU
    prof = result["cold_profile"]  # the registration and the engine's step are where time goes
    names = [r["function"] for r in prof["by_cumulative"]]
    assert any("manager.py" in n and " register" in n for n in names), names
    assert any("engine.py" in n and " step" in n for n in names), names
    assert all(r["own_ms"] <= r["cumulative_ms"] + 1e-6 for r in prof["by_own"])
    # the profile of each configuration and of the base model at batch 1 and 32: the device's
    # busy time (here the top-level CPU ops') within the step, the time of its parts below it
    profiles = [result["profile"]["1"], result["profile"]["32"],
                *(result["adapters"][c]["profile"] for c in ("base", "lora-qv", "lora-heavy"))]
    assert [p["batch"] for p in profiles] == [1, 32, 32, 32, 32]
    for prof in profiles:
        assert prof["kernels_per_step"] > 0 and prof["top"]
        busy = prof["device_busy_us_per_step"]
        assert 0 < busy <= prof["kernel_us_per_step"] + 1e-6
        assert busy <= prof["profiled_step_ms"] * 1e3
        assert sum(k["share"] for k in prof["top"]) <= 1 + 1e-9
    text, _ = gpu_report.report(tmp_path)  # the report's profile lines read these
    assert "SmolLM2, lora-heavy, batch 32:" in text and "SmolLM2, base, batch 1:" in text
    assert "SmolLM2, the adapters section's run by phase, ms in prefill / decode steps" in text


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    """One GPU run measures what it can: a section that raises (here the floor, with requests
    in flight) is named under "errors", the engine is cleared of its requests, the next
    section runs, and the script exits 1."""
    from bench import gpu_engine
    from bench.common import start_decoding

    def broken(engine, base):
        start_decoding(engine, base[:3])
        raise RuntimeError("the floor broke")

    monkeypatch.setattr(gpu_engine, "decode_floor", broken)
    monkeypatch.setattr(gpu_engine, "DEV", gpu_engine.DEV)  # main() sets both: put back after
    monkeypatch.setattr(gpu_engine, "REPEAT", gpu_engine.REPEAT)
    out = tmp_path / "gpu_engine.json"
    monkeypatch.setattr(sys, "argv", [
        "gpu_engine", "--device", "cpu", "--shape", "tiny", "--model-dir",
        str(resolve_model_dir("default")), "--weights-dir", str(tmp_path / "w"),
        "--sections", "floor,cold", "--repeat", "1", "--out", str(out)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        gpu_engine.main()
    assert exit_.value.code == 1
    result = json.loads(out.read_text())
    assert result["errors"] == {"floor": "RuntimeError: the floor broke"}
    assert "decode_floor" not in result
    assert result["cold_register_to_first_token_ms"]["p50"] > 0
