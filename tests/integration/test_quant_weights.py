"""int8 / int4 base weights (EngineConfig.weights, kernels/quant.py): the model holds only the
quantized form where the C++ kernels run, and the dequantized weights (rounded to bf16) dense
elsewhere; the engine serves every adapter kind on top, the one-call decode stack giving the
Python layers' tokens exactly, and the C++ kernels the tokens of the reference backend over the
dequantized weights."""

from __future__ import annotations

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.errors import UnsupportedModel
from peftserve.kernels import cpu_ext, quant
from peftserve.layers.backend import Backend, CpuBackend
from peftserve.models.llama import LlamaModel
from peftserve.models.loader import load_config, load_state_dict
from tests.backends import counted_cpu_backend
from tests.integration.test_adapter_batching import MIX, adapter_dirs, engine_with, requests
from tests.integration.test_adapter_batching import tokens as adapter_tokens

__all__ = ["adapter_dirs"]  # the module-scoped fixture, used here too

CPU = torch.device("cpu")
KINDS = ["int8", "int4"]
CODES = {"int8": torch.int8, "int4": torch.uint8, "bf16": torch.bfloat16}



@pytest.fixture(autouse=True, scope="module")
def _kernels():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"


def model(path, weights: str, backend: Backend) -> LlamaModel:
    config, state = load_config(path), load_state_dict(path)
    return LlamaModel(config, state, torch.bfloat16, CPU, backend, weights)


@pytest.mark.parametrize("weights", KINDS)
def test_the_model_holds_the_quantized_weights_only(tiny_llama_dir, weights):
    m = model(tiny_llama_dir, weights, CpuBackend(native=True))
    for layer in m.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            assert lin.weight is None and lin.packed is None
            assert lin.gemv is not None and lin.gemv.dtype == CODES[weights]
            assert lin.matmul_weight(1) is lin.gemv and lin.matmul_weight(512) is lin.gemv
    assert m.lm_head_gemv is not None and m.lm_head_gemv.dtype == CODES[quant.LM_HEAD[weights]]
    # without the C++ kernels: the same quantized values, dequantized to bf16, dense
    ref = model(tiny_llama_dir, weights, Backend())
    lin, dense = m.layers[1].gate_up, ref.layers[1].gate_up
    assert dense.gemv is None and torch.equal(dense.weight, lin.dense_weight())
    assert torch.equal(ref.lm_head_dense(), m.lm_head_dense())
    assert not torch.equal(ref.embed, ref.lm_head)  # the tied embedding table stays bf16


def test_quantized_weights_compute_in_bfloat16(tiny_llama_dir):
    config, state = load_config(tiny_llama_dir), load_state_dict(tiny_llama_dir)
    with pytest.raises(UnsupportedModel, match="bfloat16"):
        LlamaModel(config, state, torch.float32, CPU, CpuBackend(native=True), "int8")
    with pytest.raises(ValueError, match="weights"):
        EngineConfig(weights="int3")
    with pytest.raises(ValueError, match="bfloat16"):
        EngineConfig(weights="int4", dtype="float32")


@pytest.mark.parametrize("weights", KINDS)
def test_layer_outputs_match_the_dequantized_weights(tiny_llama_dir, weights):
    m, ref = model(tiny_llama_dir, weights, CpuBackend(native=True)), model(
        tiny_llama_dir, weights, Backend())  # fmt: skip
    g = torch.Generator().manual_seed(0)
    pairs = ((m.layers[0].qkv, ref.layers[0].qkv), (m.layers[1].down, ref.layers[1].down))
    for lin, dense in pairs:
        for rows in (1, 5, 8, 33):
            x = torch.randn(rows, lin.in_features, generator=g).to(torch.bfloat16)
            want = x.double() @ quant.dequantize(lin.gemv, lin.in_features).T
            got, near = lin(x).double(), dense(x).double()
            scale = want.abs().max()
            assert (got - want).abs().max() <= 0.01 * scale
            assert (near - want).abs().max() <= 0.02 * scale


@pytest.mark.parametrize("weights", KINDS)
def test_every_adapter_kind_on_quantized_weights(tiny_llama_dir, adapter_dirs, weights):
    """Base, LoRA, bottleneck, prefix, prompt tuning and template requests in one batch: the
    one-call decode stack took the decode steps and gives the Python layers' tokens; each
    adapter changes its request's tokens; the reference over the dequantized weights agrees."""
    names = MIX + MIX[::-1]
    backend, calls = counted_cpu_backend()
    engine = engine_with(tiny_llama_dir, adapter_dirs, dtype="bfloat16", weights=weights,
                         backend=backend)  # fmt: skip
    got = adapter_tokens(engine.generate(requests(names, seed=2)))
    assert calls["decode_forward"] and engine.slots.plans_built
    assert all(len(t) >= 6 for t in got.values())
    layers = CpuBackend(native=True, decode_stack=False)
    engine = engine_with(tiny_llama_dir, adapter_dirs, dtype="bfloat16", weights=weights,
                         backend=layers)  # fmt: skip
    assert adapter_tokens(engine.generate(requests(names, seed=2))) == got
    base = adapter_tokens(engine.generate(requests([None] * len(names), seed=2)))
    for (rid, t), b in zip(got.items(), base.values(), strict=True):
        if not rid.startswith("base"):
            assert t != b, f"{rid} gave the base model's tokens"
    engine = engine_with(tiny_llama_dir, adapter_dirs, dtype="bfloat16", weights=weights,
                         backend=Backend())  # fmt: skip
    ref = adapter_tokens(engine.generate(requests(names, seed=2)))
    same = sum(a == b for r in got for a, b in zip(got[r], ref[r], strict=True))
    assert same >= 0.9 * sum(len(t) for t in got.values())
