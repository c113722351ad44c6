"""The C++ kernels share the process's C++ runtime with torch, whatever the compiler's default.

The H200 image's g++ finds only libstdc++.a for -lstdc++ (no libstdc++.so in its search path):
a library built there carried a private copy of the C++ runtime, and a failed argument check
whose message prints a tensor's sizes crashed the process with SIGSEGV inside that copy's
std::ostream (bench/native_cases.sh, bench/results/gpu_2026-12-04b). Here compiler wrappers do
what that g++ does, and what a g++ told -static-libstdc++ does, and a small library with a
failing TORCH_CHECK that prints sizes is built with the kernels' own flags (cpu_ext.build_flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.native_probe import CALL_PROBE, SOURCE
from peftserve.kernels import cpu_ext


def _static_libstdcxx(cxx: str) -> str:
    found = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True,
                           text=True, check=False).stdout.strip()  # fmt: skip
    # g++ ships it (Debian's libstdc++-dev, which g++ depends on; the H200 image links with it)
    assert os.path.isabs(found) and os.path.exists(found), f"{cxx} has no libstdc++.a to link"
    return found


@pytest.mark.parametrize("compiler", ["only_libstdcxx_a_found", "static_libstdcxx_flag"])
def test_a_library_built_by_a_static_libstdcxx_compiler_raises_whole_messages(
    tmp_path: Path, compiler: str
):
    cxx = os.environ.get("CXX", "c++")
    static = _static_libstdcxx(cxx)
    if compiler == "only_libstdcxx_a_found":
        # A directory searched before the compiler's own, holding only the archive: every
        # -lstdc++ (the compiler's included) links it, as on the H200 image
        only = tmp_path / "static_only"
        only.mkdir()
        (only / "libstdc++.a").symlink_to(static)
        extra = f"-L{only}"
    else:
        extra = "-static-libstdc++"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nexec {cxx} "$@" {extra}\n')
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
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    assert "[libstdc++.so.6]" in needed, "the library does not use the shared C++ runtime"
    defined = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert " __cxa_throw" not in defined, "the library carries its own C++ runtime"
    assert " _ZNSo9_M_insertIlEERSoT_" not in defined, "the library carries its own ostream"
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
