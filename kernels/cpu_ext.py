"""peftserve's C++ CPU kernels (csrc/), built once per machine on first use.

    if cpu_ext.load():                     # builds on the first call (~20 s), then loads
        torch.ops.peftserve_cpu.paged_decode_attention(out, q, cache, tables, lens, bs, scale)

Ops (torch.ops.peftserve_cpu.*): paged_decode_attention (decode attention reading KV blocks in
place; every dtype), rms_norm, rotary_and_cache, silu_and_mul (the small per-layer work, half
precision: fp32 keeps transformers' op sequence for parity), lora_rows and bottleneck_rows (a
step's adapter deltas in half precision, token by token at each slot's exact rank) and
decode_forward (a decode-only step's whole decoder stack in one call).

The build uses torch's extension builder (a C++ compiler and ninja) with -O3 -march=native into
~/.cache/peftserve/kernels/<key> (`PEFTSERVE_KERNEL_CACHE` replaces ~/.cache/peftserve), where
the key covers the sources, torch's version, the flags and this CPU's model and flags: a later
start (or another process) only loads the library. When
no compiler is there, or `PEFTSERVE_CPU_KERNELS=0`, `load()` returns False once with a warning
and the callers keep their plain-torch paths (the same computation; bf16 decode attention then
rounds its scores and probabilities to bf16 as the torch matmuls do).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
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
    )
)
HEADERS = (CSRC / "ops.h", CSRC / "vec_math.h")
# No -ffast-math: results stay IEEE; these two only let loops with exp/sqrt/selects vectorize.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
ENV_SWITCH = "PEFTSERVE_CPU_KERNELS"

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


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
    h.update(" ".join(CFLAGS).encode())
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


def _build_and_load() -> bool:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("C++ CPU kernels disabled (%s=0): plain torch paths", ENV_SWITCH)
        return False
    try:
        from torch.utils import cpp_extension

        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        log.info("loading the C++ CPU kernels from %s (built on first use)", out)
        cpp_extension.load(
            name="peftserve_cpu",
            sources=[str(s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            build_directory=str(out),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the torch paths remain
        log.warning("C++ CPU kernels unavailable, using the plain torch paths: %s", e)
        return False
    return True
