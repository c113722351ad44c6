"""bench/gpu.sh's time limits, run on the CPU with a stand-in for the GPU machine's python: a step
that hangs is stopped at its limit, one that ignores the TERM is killed, one that crashes fails
alone, the run's budget cuts the last limits and skips what no longer fits, and the report
still runs. The stand-in answers each step by its command line (FAKE_PY below)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench import gpu_report

REPO = Path(__file__).resolve().parents[2]
STEPS = (
    "engine_bench_8b", "engine_bench", "engine_cuda_tests", "kernel_tests",
    "decode_kernels_bench", "native_kernels", "fused_ops_bench", "kernels_bench",
)  # fmt: skip

# MODE=ok: every step succeeds. MODE=bad: the 8B bench hangs, the SmolLM2 bench hangs and
# ignores TERM, the engine tests crash (SIGSEGV), the kernel tests hang. Each call is logged.
FAKE_PY = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  "-c import peftserve.kernels") exit 0 ;;
  "-") cat > /dev/null; echo "FakeGPU {}" ;;
  *bench.gpu_report*) echo "report from $3" ;;
  *) [ "$MODE" = ok ] && { echo "ran: $*"; exit 0; } ;;
esac
case "$*" in
  *gpu_engine*llama-3.1-8b*) exec sleep 600 ;;
  *gpu_engine*) trap '' TERM; sleep 600 ;;
  *test_cuda_graphs*) ulimit -c 0; kill -SEGV $$ ;;  # no core file left behind
  *pytest*tests/kernels*) exec sleep 600 ;;
esac
echo "ran: $*"
"""


def run_gpu_sh(
    tmp_path: Path, mode: str, **limits: int | str
) -> tuple[subprocess.CompletedProcess, float]:
    """gpu.sh under FAKE_PY: (its exit status, output, and in `stderr` the processes it left
    alive in its session), and its wall time."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ, "PYTHON": str(fake), "OUT": str(out), "MODEL_DIR": str(tmp_path),
        "CALLS": str(tmp_path / "calls"), "MODE": mode, "CXX": "true",
        **{k: str(v) for k, v in limits.items()},
    }  # fmt: skip
    env.pop("STEPS", None)
    if "STEPS" in limits:
        env["STEPS"] = str(limits["STEPS"])
    t0 = time.monotonic()
    run = subprocess.Popen(
        ["bash", str(REPO / "bench" / "gpu.sh")], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, _ = run.communicate(timeout=90)
        wall = time.monotonic() - t0
        # what the run left alive in its session (timeout puts each step in a group of its own)
        left = subprocess.run(["pgrep", "-a", "-s", str(run.pid)], capture_output=True, text=True)
    finally:  # a run that overstays, and anything it left, goes
        subprocess.run(["pkill", "-KILL", "-s", str(run.pid)])
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, left.stdout), wall


def test_every_step_runs_and_reports(tmp_path):
    done, _ = run_gpu_sh(tmp_path, "ok")
    assert done.returncode == 0, done.stdout
    status = gpu_report.step_status(tmp_path / "out")
    assert status == {step: "exit 0" for step in STEPS}
    assert f"report from {tmp_path / 'out'}" in (tmp_path / "out" / "gpu_report.md").read_text()
    calls = (tmp_path / "calls").read_text()
    assert "--shape llama-3.1-8b" in calls and "PEFTSERVE_TEST_DEVICE" not in calls
    assert "peftserve.kernels.cpu_selftest" in calls


def test_hangs_and_crashes_fail_their_steps_and_the_budget_holds(tmp_path):
    budget, report = 20, 1
    done, wall = run_gpu_sh(
        tmp_path, "bad", BUDGET=budget, T_REPORT=report, T_ENGINE_BENCH_8B=2,
        T_ENGINE_BENCH=1, T_KERNEL_TESTS=100,
    )  # fmt: skip
    out = tmp_path / "out"
    assert done.returncode == 1, done.stdout
    status = gpu_report.step_status(out)
    assert status["engine_bench_8b"] == "exit 124"  # TERM at its limit
    assert status["engine_bench"] == "exit 137"  # TERM ignored: KILL 5 s later
    assert status["engine_cuda_tests"] not in ("exit 0", "exit 124")  # crashed at once
    assert status["kernel_tests"] == "exit 124"  # its 100 s cut to what the budget left
    # the rest did not fit: skipped, and counted as failures
    assert [s for s in STEPS if status[s] == "skipped"] == list(STEPS[4:])
    log = (out / "steps.log").read_text()
    took = {line.split(":")[0][3:]: int(line.split()[-2]) for line in log.splitlines()
            if " in " in line}  # fmt: skip
    assert took["engine_bench_8b"] <= 3 and 5 <= took["engine_bench"] <= 8
    assert took["kernel_tests"] <= budget - report - 5
    assert wall < budget + 3, f"the run took {wall:.1f} s against a budget of {budget} s"
    assert "report from" in (out / "gpu_report.md").read_text()
    assert done.stderr == "", f"left alive after the run: {done.stderr}"


def test_the_opt_in_steps_run_when_named(tmp_path):
    """engine_cuda_tests_eager (the oracle tests with graphs off), overlap_kernels
    (decode_kernels.py --ops overlap) and lora_overlap_engine (the 8B adapters section with
    lora_overlap delta, then shrink), each only when STEPS names it."""
    steps = ("engine_cuda_tests_eager", "overlap_kernels", "lora_overlap_engine")
    done, _ = run_gpu_sh(tmp_path, "ok", STEPS=" ".join(steps))
    assert done.returncode == 0, done.stdout
    assert gpu_report.step_status(tmp_path / "out") == dict.fromkeys(steps, "exit 0")
    calls = (tmp_path / "calls").read_text().splitlines()
    tests = [c for c in calls if c.startswith("-m pytest")]
    assert len(tests) == 1 and "test_parity.py" in tests[0] and "test_cuda_graphs" not in tests[0]
    runs = [c for c in calls if "decode_kernels.py" in c or "gpu_engine" in c]
    assert "--ops overlap" in runs[0] and "--shapes llama-3.1-8b" in runs[0]
    assert ["--lora-overlap delta" in runs[1], "--lora-overlap shrink" in runs[2]] == [True, True]
    assert runs[1].endswith("gpu_engine_8b_overlap_delta.json") and len(runs) == 3
