"""PEFTSERVE_TEST_CUDA_GRAPHS=0 (tests/device.py): the engines the oracle tests build run their
decode steps eagerly, so that bench/gpu.sh can run those tests on a GPU with graphs off too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from tests.device import without_cuda_graphs

REPO = Path(__file__).resolve().parents[2]


def test_engines_built_within_it_have_cuda_graphs_off(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=16)
    assert Engine.from_config(config).config.cuda_graphs is True
    with without_cuda_graphs():
        engine = Engine.from_config(config)
    assert engine.config.cuda_graphs is False and engine.config.num_kv_blocks == 16
    assert Engine.from_config(config).config.cuda_graphs is True  # undone on leaving


def test_the_environment_turns_it_on_for_a_whole_run(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "from peftserve.config import EngineConfig\n"
        "from peftserve.engine.engine import Engine\n"
        "def test_probe(tiny_llama_dir):\n"
        "    config = EngineConfig(model=str(tiny_llama_dir), dtype='float32', num_kv_blocks=16)\n"
        "    assert Engine.from_config(config).config.cuda_graphs is False\n"
    )  # fmt: skip
    env = {**os.environ, "PEFTSERVE_TEST_CUDA_GRAPHS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         str(probe)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
