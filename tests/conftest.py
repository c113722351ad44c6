from __future__ import annotations

import pytest

from tests.tiny import make_model_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), model_type="qwen2", seed=1)
