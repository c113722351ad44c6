"""Installing peftserve's built wheel into an environment that already holds a torch within the
supported range keeps that torch (pip's own resolver decides, from the package index, as for a
user); with constraints.txt, as `make install` runs it, torch is pinned to the tested 2.13.0.

The torch already installed is a minimal distribution (its metadata and a module), so that no
second multi-GB torch build is needed; the resolver reads only the metadata."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
OTHER_TORCH = "2.12.0"  # inside pyproject's range, not the version CI installs
TESTED_TORCH = "2.13.0"


def run(*cmd: str | Path, timeout: float = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    log = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, ROOT)
    assert "is absent from the `packages` configuration" not in log, log
    (built,) = out.glob("peftserve-*.whl")
    return built


def torch_stand_in(folder: Path, version: str) -> Path:
    """A wheel named torch at `version`: metadata and a module, nothing else."""
    path = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: peftserve-tests\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    """A fresh venv whose torch is OTHER_TORCH."""
    folder = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", folder / "venv")
    python = folder / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-index", torch_stand_in(folder, OTHER_TORCH))
    installed = run(python, "-c", "import torch; print(torch.__version__)").strip()
    assert installed == OTHER_TORCH
    return python


def planned(python: Path, *args: str | Path) -> dict[str, str]:
    """What `pip install ARGS` would install: name -> version (pip's --dry-run report)."""
    out = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "-q",
                          "--disable-pip-version-check", "--report", "-", *map(str, args)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}


def test_the_wheel_declares_a_torch_range(wheel):
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read("peftserve-0.1.0.dist-info/METADATA").decode()
    reqs = {r.name: r for r in (Requirement(line.split(":", 1)[1].strip())
                                for line in metadata.splitlines()
                                if line.startswith("Requires-Dist:"))}
    torch = reqs["torch"].specifier
    assert OTHER_TORCH in torch and TESTED_TORCH in torch
    assert not any(s.operator == "==" for s in torch), torch


def test_installing_the_wheel_keeps_the_torch_in_range(python, wheel):
    plan = planned(python, wheel)
    assert plan.get("peftserve") == "0.1.0"
    assert "torch" not in plan, f"pip would replace torch {OTHER_TORCH} by {plan['torch']}"


def test_constraints_pin_the_tested_torch(python, wheel):
    plan = planned(python, "-c", ROOT / "constraints.txt", wheel)
    assert plan["torch"].split("+")[0] == TESTED_TORCH
