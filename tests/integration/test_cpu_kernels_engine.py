"""The engine on the CPU with and without its C++ kernels (as on a machine with no compiler),
over decode steps with mixed context lengths and prefills joining them: the same greedy tokens
in fp32; and in bf16 the one-call decode stack (decode_forward) gives the Python layers' tokens
exactly, Qwen2's q/k/v biases included."""

from __future__ import annotations

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.kernels import cpu_ext
from peftserve.models.llama import LlamaModel
from tests.integration.test_batching import make_requests, tokens


def run(path, dtype: str) -> dict[str, list[int]]:
    eng = Engine.from_config(
        EngineConfig(model=str(path), dtype=dtype, device="cpu", block_size=4,
                     num_kv_blocks=256, max_num_batched_tokens=64)
    )  # fmt: skip
    return tokens(eng.generate(make_requests(12, seed=4)))


def test_same_tokens_with_and_without_the_cpp_kernels(tiny_llama_dir, monkeypatch):
    assert cpu_ext.load(), "the C++ CPU kernels did not build"
    calls = []
    real = cpu_ext.load
    monkeypatch.setattr(cpu_ext, "load", lambda: calls.append(1) or real())
    with_kernels = run(tiny_llama_dir, "float32")
    assert calls, "the engine never asked for the C++ kernels"
    monkeypatch.setattr(cpu_ext, "_state", False)
    without = run(tiny_llama_dir, "float32")
    assert sum(len(t) for t in without.values()) > 100
    assert with_kernels == without


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_one_call_decode_stack_gives_the_python_layers_tokens(model, request, monkeypatch):
    path = request.getfixturevalue(model)
    assert cpu_ext.load(), "the C++ CPU kernels did not build"
    used = []
    real = LlamaModel._use_cpp_decode

    def spy(self, h, ctx):
        used.append(real(self, h, ctx))
        return used[-1]

    monkeypatch.setattr(LlamaModel, "_use_cpp_decode", spy)
    one_call = run(path, "bfloat16")
    assert any(used) and not all(used)  # decode-only steps took it, prefill steps did not
    monkeypatch.setattr(LlamaModel, "_use_cpp_decode", lambda self, h, ctx: False)
    assert run(path, "bfloat16") == one_call
