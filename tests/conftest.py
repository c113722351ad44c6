from __future__ import annotations

import os

import torch

# Triton kernels run under the interpreter on a machine without CUDA; this must be set before
# anything (transformers included) imports triton.language.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.device import CUDA_GRAPHS, without_cuda_graphs  # noqa: E402
from tests.tiny import make_model_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _cuda_graphs_as_asked():
    """PEFTSERVE_TEST_CUDA_GRAPHS=0: every engine built runs eagerly (tests/device.py)."""
    if CUDA_GRAPHS:
        yield
        return
    with without_cuda_graphs():
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), model_type="qwen2", seed=1)
