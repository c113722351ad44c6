"""The C++ CPU kernels' self-test (kernels/cpu_selftest.py), which cpu_ext.load() runs in a
child process before it loads a new build: the real one passes here, and a child that crashes,
hangs, computes wrong numbers or cannot build is reported with the op's name, never taking the
caller down."""

from __future__ import annotations

import subprocess
import sys

from peftserve.kernels import cpu_ext


def _child(body: str) -> list[str]:
    return [sys.executable, "-c", "import os, signal, sys, time\n" + body]


def test_the_real_self_test_passes_on_this_machine():
    assert cpu_ext.self_test_fault(cpu_ext.SELF_TEST_COMMAND) is None
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    assert cpu_ext.unavailable_reason() == ""
    assert (cpu_ext.build_dir() / cpu_ext.SELF_TEST_PASSED).exists()


def test_a_crash_names_the_signal_and_the_op_it_died_in():
    fault = cpu_ext.self_test_fault(_child(
        "print('start rms_norm', flush=True); print('ok rms_norm', flush=True)\n"
        "print('start lora_rows', flush=True); os.kill(os.getpid(), signal.SIGILL)"
    ))  # fmt: skip
    assert fault == "the self-test died of SIGILL in op lora_rows"


def test_wrong_numbers_are_reported_as_the_child_said():
    fault = cpu_ext.self_test_fault(_child(
        "print('start bottleneck_rows'); print('wrong bottleneck_rows: max error 3.1'); sys.exit(1)"
    ))  # fmt: skip
    assert fault == "wrong bottleneck_rows: max error 3.1"


def test_a_hang_is_cut_off_and_names_the_op():
    fault = cpu_ext.self_test_fault(
        _child("print('start decode_forward', flush=True); time.sleep(60)"), timeout_s=3
    )
    assert fault == "the self-test did not finish in 3 s in op decode_forward"


def test_a_failed_build_and_an_unexplained_exit_are_reported():
    fault = cpu_ext.self_test_fault(_child("print('build failed: no compiler'); sys.exit(2)"))
    assert fault == "build failed: no compiler"
    fault = cpu_ext.self_test_fault(_child("sys.stderr.write('ImportError: x\\n'); sys.exit(3)"))
    assert fault == "the self-test exited with status 3: ImportError: x"


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one():
    """torch's builder waits forever for its lock file; a build killed mid-way (a self-test
    child past its time limit, a killed test run) leaves one behind."""
    out = cpu_ext.build_dir()
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    (out / cpu_ext.TORCH_BUILD_LOCK).write_text("")
    done = subprocess.run(
        [sys.executable, "-c", "from peftserve.kernels import cpu_ext\n"
         "cpu_ext.compile_and_register(cpu_ext.build_dir()); print('loaded')"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr[-2000:]
    assert not (out / cpu_ext.TORCH_BUILD_LOCK).exists()


def test_march_runs_here_compares_the_builds_instruction_sets_with_the_cpus(monkeypatch):
    """`make test-march` builds only for -march values this CPU can run: AVX-512 code on a CPU
    with AVX2 alone dies of SIGILL."""
    assert cpu_ext.march_runs_here("native")
    avx2 = "flags\t\t: fpu sse2 avx avx2 fma f16c bmi2"
    monkeypatch.setattr(cpu_ext, "_cpu_signature", lambda: avx2)
    assert cpu_ext.march_runs_here("x86-64-v3")
    assert not cpu_ext.march_runs_here("skylake-avx512")
    monkeypatch.setattr(cpu_ext, "_cpu_signature", lambda: avx2 + " avx512f avx512bw avx512vl "
                        "avx512dq avx512cd")  # fmt: skip
    assert cpu_ext.march_runs_here("skylake-avx512")
    assert not cpu_ext.march_runs_here("sapphirerapids")  # BF16, AMX, FP16: none here


def test_march_adds_code_compares_the_kernels_code_paths_with_the_native_builds(monkeypatch):
    """`make test-march` skips a build that compiles the same code paths as `make test`'s."""
    assert not cpu_ext.march_adds_code("native")
    real = cpu_ext._macros
    for native, same, other in [("x86-64-v3", "haswell", "skylake-avx512"),
                                ("icelake-server", "skylake-avx512", "cooperlake"),
                                ("cooperlake", "cooperlake", "sapphirerapids"),  # AMX
                                ("sapphirerapids", "sapphirerapids", "cooperlake")]:  # fmt: skip
        def macros(march, cxx=None, native=native):
            return real(native if march == "native" else march, cxx)

        monkeypatch.setattr(cpu_ext, "_macros", macros)
        assert not cpu_ext.march_adds_code(same)
        assert cpu_ext.march_adds_code(other)
