"""Does a C++ op's failed argument check reach Python as a RuntimeError on this host?

    python -m bench.native_probe --out DIR

On the H200 machine's Intel host (torch 2.11.0+cu130, Ubuntu's g++ 13.3) the C++ CPU ops pass
their self-test, but a call that fails an argument check (TORCH_CHECK) dies of SIGSEGV instead
of raising. This separates the causes, each in a child process with a time limit:
- a two-op library (a failed TORCH_CHECK; a plain std::runtime_error) built with torch's own
  flags, with ours (-O3 -march=native -fopenmp ...), with ours at -march=x86-64-v3, and with
  -fopenmp alone: does any throw from an extension crash here, or only under some flag?
- peftserve's own library (kernels/cpu_ext.py) at -march=native and at x86-64-v3: lora_rows
  with float tensors, which its first check refuses;
- the same call under cuda-gdb (that image has no gdb), for the native backtrace of the fault;
- the libraries' linked runtimes (ldd) and torch's build configuration.
Prints each outcome and writes them to DIR/native_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SOURCE = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
#include <stdexcept>

static at::Tensor probe_check(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "probe: refused a tensor of sizes ", x.sizes());
  return x;
}
static at::Tensor probe_throw(const at::Tensor& x) {
  if (x.dim() != 99) throw std::runtime_error("probe: a plain runtime_error");
  return x;
}
TORCH_LIBRARY(LIBNAME, m) {
  m.def("check(Tensor x) -> Tensor");
  m.def("throw_(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(LIBNAME, CPU, m) {
  m.impl("check", probe_check);
  m.impl("throw_", probe_throw);
}
"""
OURS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
VARIANTS = {
    "torch_flags": [],
    "ours_native": ["-march=native", *OURS],
    "ours_v3": ["-march=x86-64-v3", *OURS],
    "openmp_only": ["-fopenmp"],
}
CALL_PROBE = """
import sys, torch
exec(sys.argv[3] if len(sys.argv) > 3 else "")
torch.ops.load_library(sys.argv[1])
ns = getattr(torch.ops, sys.argv[2])
for op in ("check", "throw_"):
    print("calling", op, flush=True)
    try:
        getattr(ns, op)(torch.zeros(2))
        print(op, "returned (the check did not fire)", flush=True)
    except Exception as e:
        print(op, "raised", type(e).__name__, str(e).splitlines()[0], flush=True)
"""
CALL_OURS = """
import torch
from peftserve.kernels import cpu_ext
assert cpu_ext.load(), cpu_ext.unavailable_reason()
print("library", cpu_ext.build_dir(), flush=True)
y, x = torch.zeros(4, 24), torch.zeros(4, 16)
A, B = torch.zeros(5, 16).bfloat16(), torch.zeros(5 * 24).bfloat16()
print("calling lora_rows with float activations", flush=True)
try:
    torch.ops.peftserve_cpu.lora_rows(y, x, None, [0, 4], [A], [B], [3, 2], [0, 12, 24])
    print("returned (the check did not fire)", flush=True)
except Exception as e:
    print("raised", type(e).__name__, str(e).splitlines()[0], flush=True)
"""


def run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    return {"rc": rc, "output": out[-6000:]}


def build_probe(name: str, flags: list[str], root: Path) -> dict:
    d = root / name
    d.mkdir()
    (d / "probe.cpp").write_text(SOURCE.replace("LIBNAME", f"probe_{name}"))
    code = (
        "import sys; from torch.utils import cpp_extension; "
        f"cpp_extension.load(name='probe_{name}', sources=['{d}/probe.cpp'], "
        f"extra_cflags={flags!r}, extra_ldflags={['-fopenmp'] if '-fopenmp' in flags else []!r},"
        f" build_directory='{d}', is_python_module=False, verbose=True)"
    )
    built = run([sys.executable, "-c", code], 240)
    lib = d / f"probe_{name}.so"
    result = {"flags": flags, "build_rc": built["rc"]}
    if not lib.exists():
        result["build_output"] = built["output"]
        return result
    result["ldd"] = run(["ldd", str(lib)], 10)["output"]
    result["call"] = run([sys.executable, "-c", CALL_PROBE, str(lib), f"probe_{name}"], 60)
    return result


def ours(march: str, root: Path) -> dict:
    env = {**os.environ, "PEFTSERVE_KERNEL_CACHE": str(root / f"cache_{march}"),
           "PEFTSERVE_KERNEL_MARCH": march}  # fmt: skip
    result = {"march": march, "call": run([sys.executable, "-c", CALL_OURS], 300, env)}
    libs = list((root / f"cache_{march}").rglob("peftserve_cpu.so"))
    if libs:
        result["ldd"] = run(["ldd", str(libs[0])], 10)["output"]
        gdb = shutil.which("cuda-gdb")
        if gdb and march == "native":
            result["cuda_gdb"] = run(
                [gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info registers rip",
                 "--args", sys.executable, "-c", CALL_OURS], 180, env,
            )  # fmt: skip
    return result


# What runs before the probe library is loaded, in --unwind's children.
PRELUDES = {
    "none": "",
    "triton": "import triton",
    "peftserve_kernels": "from peftserve.kernels import cpu_ext",
    "libgcc_s_global": "import ctypes; ctypes.CDLL('libgcc_s.so.1', mode=ctypes.RTLD_GLOBAL)",
    "cuda_used": "torch.zeros(1, device='cuda')",
}
UNWIND_SYMBOLS = ("_Unwind_", "__cxa_throw", "__gxx_personality", "__cxa_begin_catch")


def unwind(root: Path) -> dict:
    """The torch-flags probe library's throw under each prelude; the dynamic linker's bindings
    of the unwinder's symbols; the native backtrace of the fault, of the probe and of a failing
    argument check of lora_rows under pytest."""
    built = build_probe("torch_flags", [], root)
    lib = str(root / "torch_flags" / "probe_torch_flags.so")
    report: dict = {"build_rc": built["build_rc"], "ldd": built.get("ldd")}
    probe = [sys.executable, "-c", CALL_PROBE, lib, "probe_torch_flags"]
    with ThreadPoolExecutor(8) as pool:
        runs = {n: pool.submit(run, [*probe, code], 60) for n, code in PRELUDES.items()}
        env = {**os.environ, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(root / "ld")}
        ld = pool.submit(run, [*probe, ""], 60, env)
        gdb = shutil.which("cuda-gdb")
        bt = ["-q", "-batch", "-ex", "run", "-ex", "bt 30", "-ex", "info sharedlibrary"]
        if gdb:
            gdb_probe = pool.submit(run, [gdb, *bt, "--args", *probe, ""], 120)
            gdb_pytest = pool.submit(run, [gdb, *bt, "--args", sys.executable, "-m", "pytest",
                                           "-x", "-q", "-p", "no:cacheprovider",
                                           "tests/kernels/test_lowrank_rows.py", "-k",
                                           "refuse_bad_arguments"], 150)  # fmt: skip
        report["preludes"] = {n: f.result() for n, f in runs.items()}
        ld.result()
        lines = []
        for f in sorted(root.glob("ld.*")):
            lines += [ln.strip() for ln in f.read_text(errors="replace").splitlines()
                      if any(sym in ln for sym in UNWIND_SYMBOLS)]  # fmt: skip

        # the probe's and libstdc++'s bindings, then any to an unwinder other than libgcc_s
        def first(ln: str) -> int:
            to = ln.split(" to ", 1)[-1]
            return (
                0
                if "probe_" in ln or "libstdc++.so.6 [0] to" in ln
                else (1 if "libgcc_s" not in to and "libstdc++" not in to else 2)
            )

        report["ld_bindings"] = sorted(set(lines), key=lambda ln: (first(ln), ln))[:200]
        if gdb:
            report["gdb_probe"] = gdb_probe.result()
            report["gdb_pytest"] = gdb_pytest.result()
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--unwind", action="store_true", help="only the unwinder's experiments")
    args = p.parse_args()
    import torch

    if args.unwind:
        report = unwind(Path(tempfile.mkdtemp(prefix="native_unwind_")))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "native_unwind.json").write_text(json.dumps(report, indent=1))
        for name, r in report["preludes"].items():
            print(f"== prelude {name}: rc {r['rc']}: {' | '.join(r['output'].splitlines()[:4])}")
        print("== ld bindings:", *report["ld_bindings"][:60], sep="\n")
        for key in ("gdb_probe", "gdb_pytest"):
            if key in report:
                text = report[key]["output"]
                keep = [ln for ln in text.splitlines() if ln.startswith(("#", "Program", "0x"))]
                print(f"== {key}:", *keep[:70], sep="\n")
        return

    cxx = os.environ.get("CXX", "c++")
    report: dict = {
        "torch": torch.__version__,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "torch_config": torch.__config__.show()[:1500],
        "compiler": run([cxx, "--version"], 10)["output"].splitlines()[0],
        "cpu": next(
            (
                ln
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        ),  # fmt: skip
        "torch_libc10_ldd": run(["ldd", str(Path(torch.__file__).parent / "lib/libc10.so")], 10)[
            "output"
        ],  # fmt: skip
    }
    root = Path(tempfile.mkdtemp(prefix="native_probe_"))
    with ThreadPoolExecutor(8) as pool:
        probes = {n: pool.submit(build_probe, n, f, root) for n, f in VARIANTS.items()}
        real = {m: pool.submit(ours, m, root) for m in ("native", "x86-64-v3")}
        report["probes"] = {n: f.result() for n, f in probes.items()}
        report["peftserve_cpu"] = {m: f.result() for m, f in real.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "native_probe.json").write_text(json.dumps(report, indent=1))
    for key in ("torch", "cxx11_abi", "compiler", "cpu"):
        print(f"{key}: {report[key]}")
    for name, r in report["probes"].items():
        call = r.get("call", {})
        print(f"== probe {name} {r['flags']}: build rc {r['build_rc']}, call rc {call.get('rc')}")
        print(call.get("output", r.get("build_output", ""))[-1500:])
    for march, r in report["peftserve_cpu"].items():
        print(f"== peftserve_cpu {march}: call rc {r['call']['rc']}")
        print(r["call"]["output"][-1500:])
        if "cuda_gdb" in r:
            print("-- cuda-gdb:")
            print(r["cuda_gdb"]["output"][-4000:])


if __name__ == "__main__":
    main()
