"""The C++ kernels share the process's C++ runtime with torch, whatever the compiler's default.

The H200 image's g++ links libstdc++ statically: a library built there carried a private copy
of the C++ runtime, and a C++ exception thrown from it into torch (every failed argument check)
killed the process with SIGSEGV (bench/native_probe.py, bench/results/gpu_2026-12-04). Here a
compiler wrapper does what that g++ does, and a small library with a failing TORCH_CHECK is
built with the kernels' own flags (cpu_ext.build_flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.native_probe import CALL_PROBE, SOURCE
from peftserve.kernels import cpu_ext


def test_a_library_built_by_a_static_libstdcxx_compiler_raises_whole_messages(tmp_path: Path):
    cxx = os.environ.get("CXX", "c++")
    found = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True,
                           text=True, check=False).stdout.strip()  # fmt: skip
    # g++ ships it (Debian's libstdc++-dev, which g++ depends on; the H200 image links with it)
    assert os.path.isabs(found) and os.path.exists(found), f"{cxx} has no libstdc++.a to link"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nexec {cxx} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    (tmp_path / "probe.cpp").write_text(SOURCE.replace("LIBNAME", "probe_static_cxx"))
    cflags, ldflags = cpu_ext.build_flags()
    build = (
        "from torch.utils import cpp_extension\n"
        f"cpp_extension.load(name='probe_static_cxx', sources=['{tmp_path}/probe.cpp'], "
        f"extra_cflags={list(cflags)!r}, extra_ldflags={list(ldflags)!r}, "
        f"build_directory='{tmp_path}', is_python_module=False)"
    )
    env = {**os.environ, "CXX": str(wrapper)}
    done = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lib = tmp_path / "probe_static_cxx.so"
    defined = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert " __cxa_throw" not in defined, "the library carries its own C++ runtime"
    called = subprocess.run([sys.executable, "-c", CALL_PROBE, str(lib), "probe_static_cxx"],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert called.returncode == 0, called.stderr[-3000:]
    assert "check raised RuntimeError probe: refused a tensor of sizes [2]\n" in called.stdout
    assert "throw_ raised RuntimeError probe: a plain runtime_error\n" in called.stdout


def test_the_self_test_checks_a_refused_call_first():
    """A library whose exceptions cannot cross into torch is refused before it serves."""
    from peftserve.kernels import cpu_selftest

    first = next(iter(cpu_selftest.CHECKS))
    assert cpu_selftest.CHECKS[first] is cpu_selftest.check_refusal
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    cpu_selftest.check_refusal(None)
