"""CI fails when the committed protobuf/gRPC code is stale: regenerate and compare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "server" / "api"
PACKAGES = ("peftserve/v1", "peftserve/kserve_v2")  # each proto folder's generated package
HAND_WRITTEN = {"__init__.py"}


def protoc(out: Path) -> None:
    """The same command as `make proto`, into `out`."""
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={out}",
                    f"--pyi_out={out}", f"--grpc_python_out={out}", *protos],
                   cwd=ROOT, check=True, capture_output=True, text=True)


def test_every_proto_folder_is_generated():
    folders = {str(p.parent.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto")}
    assert folders == set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_generated_code_is_fresh(tmp_path, package):
    protoc(tmp_path)
    fresh = {p.name: p.read_text() for p in (tmp_path / package).iterdir()}
    committed = {p.name: p.read_text() for p in (API / package).iterdir()
                 if p.is_file() and p.name not in HAND_WRITTEN}
    assert fresh, f"protoc wrote nothing for {package}"
    assert sorted(committed) == sorted(fresh), "run `make proto` and commit server/api"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code: {stale}; run `make proto` and commit server/api"
