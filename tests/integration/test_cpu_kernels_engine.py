"""The engine on the CPU with and without its C++ kernels (as on a machine with no compiler),
over decode steps with mixed context lengths and prefills joining them: the same greedy tokens
in fp32; and the one-call decode stack (decode_forward) gives the Python layers' tokens exactly,
in bf16 and fp32, Qwen2's q/k/v biases and every adapter form of the hook included."""

from __future__ import annotations

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.kernels import cpu_ext, packed_linear
from peftserve.models.llama import LlamaModel
from tests.integration.test_batching import make_requests, tokens


def run(path, dtype: str) -> dict[str, list[int]]:
    eng = Engine.from_config(
        EngineConfig(model=str(path), dtype=dtype, device="cpu", block_size=4,
                     num_kv_blocks=256, max_num_batched_tokens=64)
    )  # fmt: skip
    return tokens(eng.generate(make_requests(12, seed=4)))


def spy_on_cpp_decode(monkeypatch, with_adapters: bool = False) -> list[bool]:
    """Records, per forward, whether the one-call decode stack ran it (and, with
    `with_adapters`, with adapter deltas)."""
    used: list[bool] = []
    real = LlamaModel._cpp_decode_plan

    def spy(self, h, ctx):
        plan = real(self, h, ctx)
        used.append(plan is not None and (ctx.hook is not None or not with_adapters))
        return plan

    monkeypatch.setattr(LlamaModel, "_cpp_decode_plan", spy)
    return used


def require_packing() -> None:
    if not packed_linear.enabled(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU's oneDNN has no bf16 matmul to pack for")


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_packed_weights_give_the_dense_weights_tokens(model, request, monkeypatch):
    """bf16 on the CPU serves from oneDNN-packed weights; the tokens are those of the dense
    weights, prefill and decode, with and without the one-call stack."""
    require_packing()
    path = request.getfixturevalue(model)
    calls = []
    real = packed_linear.linear
    monkeypatch.setattr(packed_linear, "linear", lambda *a: calls.append(1) or real(*a))
    packed = run(path, "bfloat16")
    assert calls, "no matmul ran on packed weights"
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "0")
    calls.clear()
    dense = run(path, "bfloat16")
    assert not calls
    assert sum(len(t) for t in dense.values()) > 100
    assert packed == dense
    monkeypatch.setattr(LlamaModel, "_cpp_decode_plan", lambda self, h, ctx: None)
    assert run(path, "bfloat16") == dense


def test_same_tokens_with_and_without_the_cpp_kernels(tiny_llama_dir, monkeypatch):
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    calls = []
    real = cpu_ext.load
    monkeypatch.setattr(cpu_ext, "load", lambda: calls.append(1) or real())
    with_kernels = run(tiny_llama_dir, "float32")
    assert calls, "the engine never asked for the C++ kernels"
    monkeypatch.setattr(cpu_ext, "_state", False)
    without = run(tiny_llama_dir, "float32")
    assert sum(len(t) for t in without.values()) > 100
    assert with_kernels == without


@pytest.mark.parametrize(
    "dtype,packed", [("bfloat16", True), ("bfloat16", False), ("float32", False)]
)
@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_one_call_decode_stack_gives_the_python_layers_tokens(
    model, dtype, packed, request, monkeypatch
):
    path = request.getfixturevalue(model)
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    if packed:  # weights packed for oneDNN (kernels/packed_linear.py), as bf16 serves here
        require_packing()
    else:
        monkeypatch.setenv(packed_linear.ENV_SWITCH, "0")
    used = spy_on_cpp_decode(monkeypatch)
    one_call = run(path, dtype)
    assert any(used) and not all(used)  # decode-only steps took it, prefill steps did not
    monkeypatch.setattr(LlamaModel, "_cpp_decode_plan", lambda self, h, ctx: None)
    assert run(path, dtype) == one_call


@pytest.fixture(scope="module")
def lora_dirs(tiny_llama_dir, tmp_path_factory):
    from tests import adapters as A

    root = tmp_path_factory.mktemp("cpp-decode-adapters")
    return {
        "qv-r4": A.make_lora(tiny_llama_dir, root / "qv-r4", r=4, seed=11),
        "qv-r8": A.make_lora(tiny_llama_dir, root / "qv-r8", r=8, seed=12),
        "all-r2": A.make_lora(tiny_llama_dir, root / "all-r2", r=2, seed=13, targets=A.ALL_LINEAR),
        "all-r6": A.make_lora(tiny_llama_dir, root / "all-r6", r=6, seed=15, targets=A.ALL_LINEAR),
        "houlsby": A.make_bottleneck(tiny_llama_dir, root / "houlsby", "houlsby", seed=14),
        "pfeiffer": A.make_bottleneck(tiny_llama_dir, root / "pfeiffer-relu", "pfeiffer", seed=17),
        "pfeiffer-gelu": A.make_bottleneck(
            tiny_llama_dir, root / "pfeiffer", "pfeiffer", scaling=0.7, seed=16,
            non_linearity="gelu",
        ),
    }


@pytest.mark.parametrize(
    "names",
    [
        ["qv-r4", "qv-r8", "all-r2", "all-r6", "qv-r8"],  # LoRAs, every row a slot
        [None, "all-r6", None, "qv-r8", "all-r2", "qv-r4"],  # base rows among them
        ["qv-r4", "qv-r8", "all-r2"],  # o/gate/up/down with one live slot: one segment
        ["qv-r4", "houlsby", "qv-r8", "pfeiffer", "houlsby"],  # bottlenecks, rows in order
        [None, "houlsby", "qv-r4", None, "pfeiffer-gelu", "all-r2"],  # ... rows gathered
    ],
)
def test_one_call_decode_stack_with_adapter_deltas_gives_the_python_layers_tokens(
    tiny_llama_dir, lora_dirs, names, monkeypatch
):
    from tests.integration.test_adapter_batching import engine_with, requests
    from tests.integration.test_adapter_batching import tokens as adapter_tokens

    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    engine = engine_with(tiny_llama_dir, lora_dirs, dtype="bfloat16")
    used = spy_on_cpp_decode(monkeypatch, with_adapters=True)
    one_call = adapter_tokens(engine.generate(requests(names, seed=3)))
    assert any(used)  # decode steps with adapters took the one-call stack
    monkeypatch.setattr(LlamaModel, "_cpp_decode_plan", lambda self, h, ctx: None)
    assert adapter_tokens(engine.generate(requests(names, seed=3))) == one_call


def test_one_call_decode_stack_reuses_its_plan_only_while_the_slots_hold_the_same_adapters(
    tiny_llama_dir, lora_dirs, monkeypatch
):
    """Consecutive decode steps of one batch reuse the step's DecodePlan; with 2 slots for 7
    adapters, slots are rewritten mid-run (the same slot indices, other weights) and every
    request's tokens stay those of the Python layers, which read the slots directly."""
    from peftserve.adapters.slots import AdapterHook
    from tests.integration.test_adapter_batching import engine_with, requests
    from tests.integration.test_adapter_batching import tokens as adapter_tokens

    builds, calls = [], []
    real_build, real_plan = AdapterHook._build_plan, AdapterHook.decode_plan
    monkeypatch.setattr(AdapterHook, "_build_plan",
                        lambda self, n: builds.append(1) or real_build(self, n))  # fmt: skip
    monkeypatch.setattr(AdapterHook, "decode_plan",
                        lambda self, n: calls.append(1) or real_plan(self, n))  # fmt: skip
    engine = engine_with(tiny_llama_dir, lora_dirs, dtype="bfloat16", max_loras=2)
    names = list(lora_dirs) * 2
    one_call = adapter_tokens(engine.generate(requests(names, seed=5)))
    assert engine.adapters.evictions > 0
    assert 0 < len(builds) < len(calls)  # some steps reused the plan, and not all
    monkeypatch.setattr(LlamaModel, "_cpp_decode_plan", lambda self, h, ctx: None)
    assert adapter_tokens(engine.generate(requests(names, seed=5))) == one_call
