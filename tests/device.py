"""The device the engine-level integration tests run on.

CPU by default (CI has no GPU). On a CUDA machine, `PEFTSERVE_TEST_DEVICE=cuda` runs the same
oracle tests (transformers / PEFT on the CPU in fp32) against the engine on the GPU, where LoRA
and bottleneck deltas go through the Triton kernels; TF32 stays off so fp32 means fp32. With
`PEFTSERVE_TEST_CUDA_GRAPHS=0` as well, every engine the tests build runs its decode steps
eagerly, as `--no-cuda-graphs` serves (tests/conftest.py: the oracle tests with graphs off,
bench/gpu.sh's engine_cuda_tests_eager).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from peftserve.config import EngineConfig

DEVICE = os.environ.get("PEFTSERVE_TEST_DEVICE", "cpu")
CUDA_GRAPHS = os.environ.get("PEFTSERVE_TEST_CUDA_GRAPHS", "1") != "0"

if DEVICE.startswith("cuda"):
    if not torch.cuda.is_available():
        raise RuntimeError("PEFTSERVE_TEST_DEVICE=cuda but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@contextmanager
def without_cuda_graphs() -> Iterator[None]:
    """Within it, Engine.from_config builds every engine with config.cuda_graphs False."""
    from peftserve.engine.engine import Engine

    build = Engine.from_config.__func__  # type: ignore[attr-defined]

    def eager(cls, config: EngineConfig, backend=None) -> Engine:
        return build(cls, replace(config, cuda_graphs=False), backend)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "from_config", classmethod(eager))
        yield
