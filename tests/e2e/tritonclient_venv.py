"""A virtual environment holding only tritonclient[grpc], as a KServe/Triton user would have it:
tritonclient 2.73 needs protobuf < 7 and peftserve's generated code protobuf 7, so the two never
share an environment. Created once (~20 s, from the package index) and kept in .venv-tritonclient.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENT = "tritonclient[grpc]==2.73.0"
VENV = ROOT / ".venv-tritonclient"
_MARKER = VENV / ".installed"


def tritonclient_python() -> Path:
    """The venv's python; raises RuntimeError saying why when it cannot be made."""
    python = VENV / "bin" / "python"
    if _MARKER.is_file() and _MARKER.read_text() == REQUIREMENT and python.exists():
        return python
    steps = ([sys.executable, "-m", "venv", "--clear", str(VENV)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              REQUIREMENT])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"could not create the tritonclient venv ({' '.join(cmd)}), "
                               f"needed to test the KServe v2 API with tritonclient:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    _MARKER.write_text(REQUIREMENT)
    return python
