"""The engine on the CPU with and without its C++ kernels (as on a machine with no compiler):
the same greedy tokens in fp32, over decode steps with mixed context lengths and prefills
joining them."""

from __future__ import annotations

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.kernels import cpu_ext
from tests.integration.test_batching import make_requests, tokens


def run(path) -> dict[str, list[int]]:
    eng = Engine.from_config(
        EngineConfig(model=str(path), dtype="float32", device="cpu", block_size=4,
                     num_kv_blocks=256, max_num_batched_tokens=64)
    )  # fmt: skip
    return tokens(eng.generate(make_requests(12, seed=4)))


def test_same_tokens_with_and_without_the_cpp_kernels(tiny_llama_dir, monkeypatch):
    assert cpu_ext.load(), "the C++ CPU kernels did not build"
    calls = []
    real = cpu_ext.load
    monkeypatch.setattr(cpu_ext, "load", lambda: calls.append(1) or real())
    with_kernels = run(tiny_llama_dir)
    assert calls, "the engine never asked for the C++ kernels"
    monkeypatch.setattr(cpu_ext, "_state", False)
    without = run(tiny_llama_dir)
    assert sum(len(t) for t in without.values()) > 100
    assert with_kernels == without

