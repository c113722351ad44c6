"""peftserve's C++ CPU kernels (csrc/), built once per machine on first use.

    if cpu_ext.load():                     # builds on the first call (~20 s), then loads
        torch.ops.peftserve_cpu.paged_decode_attention(out, q, cache, tables, lens, bs, scale)

Ops (torch.ops.peftserve_cpu.*): paged_decode_attention (decode attention reading KV blocks in
place; every dtype), rms_norm, rotary_and_cache, silu_and_mul (the small per-layer work, half
precision: fp32 keeps transformers' op sequence for parity), lora_rows and bottleneck_rows (a
step's adapter deltas in half precision, token by token at each slot's exact rank),
decode_forward (a decode-only step's whole decoder stack in one call) and gemv_bf16 (bf16
matrix-vector products from weights laid out for streaming, kernels/gemv.py), gemv_int8 and
gemv_int4 (the same from weight-only int8/int4 weights, kernels/quant.py).

The build uses torch's extension builder (a C++ compiler and ninja) with -O3 -march=native into
~/.cache/peftserve/kernels/<key> (`PEFTSERVE_KERNEL_CACHE` replaces ~/.cache/peftserve), where
the key covers the sources, torch's version, the flags and this CPU's model and flags: a later
start (or another process) only loads the library.

A library this process has not seen pass is never loaded into it first: the first load() on a
machine builds it and runs every op once in a child process (cpu_selftest.py, against plain
torch), and loads it only when that child passed (a marker in the build directory records it).
An op that crashes on this CPU, hangs or computes wrong numbers costs the child; load() then
returns False with a warning naming the op. So does a missing compiler or
`PEFTSERVE_CPU_KERNELS=0`; the callers keep their plain-torch paths (the same computation;
bf16 decode attention then rounds its scores and probabilities to bf16 as torch's matmuls do).

Two switches change the build, for testing (read by `build_flags()`):
`PEFTSERVE_KERNEL_MARCH` replaces `native` (e.g. `x86-64-v3`: the AVX2 code paths a CPU without
AVX-512 runs), and `PEFTSERVE_KERNEL_SANITIZE=1` builds with AddressSanitizer and
UndefinedBehaviorSanitizer (`make test-sanitize`; Python must run with libasan preloaded).

The oldest torch the ops are built and tested against is 2.11 (the CUDA image's): the sources use
only ATen's stable tensor API and TORCH_LIBRARY registration.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / f
    for f in (
        "paged_attention_cpu.cpp",
        "fused_cpu.cpp",
        "lowrank_rows_cpu.cpp",
        "decode_forward_cpu.cpp",
        "gemv_bf16_cpu.cpp",
        "gemv_quant_cpu.cpp",
        "screened_head_cpu.cpp",
    )
)
HEADERS = (CSRC / "amx.h", CSRC / "checks.h", CSRC / "ops.h", CSRC / "vec_math.h")
ENV_SWITCH = "PEFTSERVE_CPU_KERNELS"
ENV_MARCH = "PEFTSERVE_KERNEL_MARCH"
ENV_SANITIZE = "PEFTSERVE_KERNEL_SANITIZE"
SANITIZERS = "-fsanitize=address,undefined"
# The child that builds the library and runs every op once before this process loads it.
SELF_TEST_COMMAND = (sys.executable, "-m", "peftserve.kernels.cpu_selftest")
SELF_TEST_TIMEOUT_S = 900.0  # the build (~1-2 min on 2 cores; more under the sanitizers) + ops
SELF_TEST_PASSED = "selftest-passed"
TORCH_BUILD_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory


def build_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compiler flags, linker flags) of this process's build of the kernels."""
    march = os.environ.get(ENV_MARCH, "native")
    # No -ffast-math: results stay IEEE; these two only let loops with exp/sqrt/selects vectorize.
    cflags: tuple[str, ...] = (
        f"-march={march}", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
    )  # fmt: skip
    # The process's shared C++ runtime, by its file name and before the compiler's own
    # libraries. A compiler whose -lstdc++ finds only libstdc++.a (the H200 image's g++: no
    # libstdc++.so in its search path) would otherwise give the library a private copy of the
    # runtime, and a failed argument check that prints a tensor's sizes crashes the process
    # inside that copy's std::ostream (bench/native_cases.sh, bench/results/gpu_2026-12-04b).
    ldflags: tuple[str, ...] = ("-l:libstdc++.so.6",)
    if os.environ.get(ENV_SANITIZE, "0") == "1":
        # Any report aborts the process: a test run under it fails instead of printing on.
        sanitize = (SANITIZERS, "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")
        return ("-O1", *cflags, *sanitize), (SANITIZERS, *ldflags)
    return ("-O3", *cflags), ldflags


# gcc's predefined macro for an instruction set -> its /proc/cpuinfo flag: what code built for a
# -march may contain, and what this CPU must have to run it.
ISA_MACROS = {
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
    "__BMI2__": "bmi2", "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw",
    "__AVX512VL__": "avx512vl", "__AVX512DQ__": "avx512dq", "__AVX512CD__": "avx512cd",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AMX_TILE__": "amx_tile",
    "__AMX_BF16__": "amx_bf16",
}  # fmt: skip


# The instruction-set macros the kernels' sources choose their code by (kernels/csrc).
CODE_MACROS = ("__AVX2__", "__AVX512F__", "__AVX512BF16__", "__AMX_BF16__")


def _macros(march: str, cxx: str | None = None) -> set[str]:
    """The macros the compiler predefines for -march=`march`."""
    cxx = cxx or os.environ.get("CXX", "c++")
    done = subprocess.run(
        [cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("#define ")}


def build_macros(cxx: str | None = None) -> set[str]:
    """The macros the compiler predefines for this process's build (its -march, build_flags):
    which of the kernels' code paths (CODE_MACROS, ISA_MACROS) the build holds."""
    return _macros(os.environ.get(ENV_MARCH, "native"), cxx)


def march_runs_here(march: str, cxx: str | None = None) -> bool:
    """True when code built with -march=`march` runs on this CPU: every instruction set the
    compiler enables for it (ISA_MACROS) is in /proc/cpuinfo's flags. `make test-march` tests
    only such builds (AVX-512 code dies of SIGILL on a CPU with AVX2 only)."""
    macros = _macros(march, cxx)
    flags = set(_cpu_signature().split())
    return all(flag in flags for macro, flag in ISA_MACROS.items() if macro in macros)


def march_adds_code(march: str, cxx: str | None = None) -> bool:
    """True when a -march=`march` build takes other code paths of the kernels (CODE_MACROS)
    than this CPU's own build, which `make test` covers; `make test-march` skips one that does
    not (x86-64-v3 on a CPU with AVX2 alone)."""

    def paths(m: str) -> set[str]:
        return {name for name in CODE_MACROS if name in _macros(m, cxx)}

    return paths(march) != paths("native")


_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet
_reason = "not loaded yet"  # why _state is False


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def build_dir() -> Path:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    cflags, ldflags = build_flags()
    h.update(" ".join(cflags + ldflags).encode())
    h.update(torch.__version__.encode())
    h.update(_cpu_signature().encode())
    base = Path(os.environ.get("PEFTSERVE_KERNEL_CACHE", Path.home() / ".cache" / "peftserve"))
    return base / "kernels" / h.hexdigest()[:16]


def load() -> bool:
    """True when the C++ CPU ops are registered (building them if this machine has not yet)."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            _state = _build_and_load()
    return _state


def unavailable_reason() -> str:
    """Why load() returned False (its warning's text); "" once the ops are loaded."""
    return "" if _state else _reason


def _unavailable(reason: str) -> bool:
    global _reason
    _reason = reason
    log.warning("C++ CPU kernels not used, the plain torch paths serve: %s", reason)
    return False


def _build_and_load() -> bool:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        global _reason
        _reason = f"disabled ({ENV_SWITCH}=0)"
        log.info("C++ CPU kernels disabled (%s=0): plain torch paths", ENV_SWITCH)
        return False
    try:
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        marker = out / SELF_TEST_PASSED
        if not marker.exists():
            log.info("building and testing the C++ CPU kernels in %s (once per machine)", out)
            fault = self_test_fault(SELF_TEST_COMMAND)
            if fault is not None:
                return _unavailable(fault)
            marker.write_text("ok\n")
        compile_and_register(out)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch paths remain
        return _unavailable(f"{type(e).__name__}: {e}")
    return True


def compile_and_register(out: Path) -> None:
    """Builds the library into `out` (a no-op when it is up to date) and registers its ops in
    this process. load() calls it only after the self-test passed in a child process."""
    cflags, ldflags = build_flags()
    with _build_lock(out):
        # torch's builder waits, forever, for a lock file a killed build left behind; holding
        # ours, no other process is building here, so such a file is stale.
        (out / TORCH_BUILD_LOCK).unlink(missing_ok=True)
        _build(out, cflags, ldflags)


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build at a time per directory, across processes; the kernel releases it when its
    holder dies, however it dies. Makes `out` first: the self-test's child may be the first."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(out: Path, cflags: tuple[str, ...], ldflags: tuple[str, ...]) -> None:
    from torch.utils import cpp_extension

    # Under the sanitizers Python runs with their runtime preloaded; the compiler need not (it
    # runs several times slower so), and the library links the runtime itself.
    preload = os.environ.pop("LD_PRELOAD", None) if SANITIZERS in cflags else None
    try:
        cpp_extension.load(
            name="peftserve_cpu",
            sources=[str(s) for s in SOURCES],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(out),
            is_python_module=False,
            verbose=False,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def self_test_fault(command: Sequence[str], timeout_s: float = SELF_TEST_TIMEOUT_S) -> str | None:
    """Runs the self-test `command` (cpu_selftest's protocol: `start <op>` / `ok <op>` /
    `wrong <op>: ...` / `build failed: ...` lines) in a child process; None when it passed,
    else what went wrong, naming the op that crashed, hung or computed wrong numbers."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"the self-test did not finish in {timeout_s:.0f} s{_in_op(out)}"
    if done.returncode == 0:
        return None
    lines = done.stdout.splitlines()
    for line in reversed(lines):
        if line.startswith(("wrong ", "build failed: ")):
            return line
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return f"the self-test died of {name}{_in_op(done.stdout)}"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"the self-test exited with status {done.returncode}{_in_op(done.stdout)}: {tail}"


def _in_op(stdout: str) -> str:
    started = [ln[len("start ") :] for ln in stdout.splitlines() if ln.startswith("start ")]
    return f" in op {started[-1]}" if started else ""


if __name__ == "__main__":  # python -m peftserve.kernels.cpu_ext --march-to-test MARCH
    import argparse

    ap = argparse.ArgumentParser(
        description="Does `make test-march` test the kernels built for "
        "MARCH on this CPU? Exit status 0: yes."
    )
    ap.add_argument("--march-to-test", required=True, metavar="MARCH")
    march = ap.parse_args().march_to_test
    if not march_runs_here(march):
        print(f"== not tested here: this CPU lacks an instruction set -march={march} uses")
        sys.exit(1)
    if not march_adds_code(march):
        print(
            f"== not tested again: -march={march} builds the same code paths as this CPU's "
            "own build (make test)"
        )
        sys.exit(1)
    sys.exit(0)
