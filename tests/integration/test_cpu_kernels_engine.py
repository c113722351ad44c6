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
from peftserve.layers.backend import Backend, CpuBackend
from peftserve.models.llama import LlamaModel
from peftserve.models.loader import load_config, load_state_dict
from tests.backends import counted_cpu_backend
from tests.integration.test_batching import make_requests, tokens

CPU = torch.device("cpu")


def run(path, dtype: str, backend: Backend | None = None) -> dict[str, list[int]]:
    eng = Engine.from_config(
        EngineConfig(model=str(path), dtype=dtype, device="cpu", block_size=4,
                     num_kv_blocks=256, max_num_batched_tokens=64),
        backend,
    )  # fmt: skip
    return tokens(eng.generate(make_requests(12, seed=4)))


def require_packing() -> None:
    if not packed_linear.supported(torch.bfloat16):
        pytest.skip("this CPU's oneDNN has no bf16 matmul to pack for")


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_packed_weights_give_the_dense_weights_tokens(model, request):
    """bf16 on the CPU serves from oneDNN-packed weights; the tokens are those of the dense
    weights, prefill and decode, with and without the one-call stack."""
    require_packing()
    path = request.getfixturevalue(model)
    packed = run(path, "bfloat16", CpuBackend(native=cpu_ext.load()))
    dense = run(path, "bfloat16", CpuBackend(native=cpu_ext.load(), packed_weights=False))
    assert sum(len(t) for t in dense.values()) > 100
    assert packed == dense
    layers = CpuBackend(native=cpu_ext.load(), decode_stack=False)
    assert run(path, "bfloat16", layers) == dense


def test_the_backends_pack_the_weights_they_say(tiny_llama_dir):
    require_packing()
    config, state = load_config(tiny_llama_dir), load_state_dict(tiny_llama_dir)
    model = LlamaModel(config, state, torch.bfloat16, CPU, CpuBackend(native=False))
    assert model.lm_head_packed is not None
    assert all(layer.qkv.packed is not None and layer.qkv.weight is None for layer in model.layers)
    model = LlamaModel(config, state, torch.bfloat16, CPU, Backend())
    assert model.lm_head_packed is None and all(x.qkv.packed is None for x in model.layers)


def test_same_tokens_with_and_without_the_cpp_kernels(tiny_llama_dir):
    backend, calls = counted_cpu_backend()
    with_kernels = run(tiny_llama_dir, "float32", backend)
    assert calls["paged_decode_attention"] and calls["decode_forward"]
    without = run(tiny_llama_dir, "float32", CpuBackend(native=False))
    reference = run(tiny_llama_dir, "float32", Backend())
    assert sum(len(t) for t in without.values()) > 100
    assert with_kernels == without == reference


@pytest.mark.parametrize(
    "dtype,packed", [("bfloat16", True), ("bfloat16", False), ("float32", False)]
)
@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_one_call_decode_stack_gives_the_python_layers_tokens(model, dtype, packed, request):
    path = request.getfixturevalue(model)
    if packed:  # weights packed for oneDNN (kernels/packed_linear.py), as bf16 serves here
        require_packing()
    backend, calls = counted_cpu_backend(packed_weights=packed)
    one_call = run(path, dtype, backend)
    # decode-only steps took it, prefill steps did not (they ran the layers' ops)
    assert calls["decode_forward"] and calls["rotary_and_cache"]
    layers = CpuBackend(native=True, packed_weights=packed, decode_stack=False)
    assert run(path, dtype, layers) == one_call


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
    tiny_llama_dir, lora_dirs, names
):
    from tests.integration.test_adapter_batching import engine_with, requests
    from tests.integration.test_adapter_batching import tokens as adapter_tokens

    backend, calls = counted_cpu_backend()
    engine = engine_with(tiny_llama_dir, lora_dirs, dtype="bfloat16", backend=backend)
    one_call = adapter_tokens(engine.generate(requests(names, seed=3)))
    assert engine.slots.plans_built  # decode steps with adapters took the one-call stack
    assert calls["decode_forward"]
    layers = CpuBackend(native=True, decode_stack=False)
    engine = engine_with(tiny_llama_dir, lora_dirs, dtype="bfloat16", backend=layers)
    assert adapter_tokens(engine.generate(requests(names, seed=3))) == one_call


def test_one_call_decode_stack_reuses_its_plan_only_while_the_slots_hold_the_same_adapters(
    tiny_llama_dir, lora_dirs
):
    """Consecutive decode steps of one batch reuse the step's DecodePlan; with 2 slots for 7
    adapters, slots are rewritten mid-run (the same slot indices, other weights) and every
    request's tokens stay those of the Python layers, which read the slots directly."""
    from tests.integration.test_adapter_batching import engine_with, requests
    from tests.integration.test_adapter_batching import tokens as adapter_tokens

    backend, calls = counted_cpu_backend()
    engine = engine_with(tiny_llama_dir, lora_dirs, dtype="bfloat16", max_loras=2,
                         backend=backend)  # fmt: skip
    names = list(lora_dirs) * 2
    one_call = adapter_tokens(engine.generate(requests(names, seed=5)))
    assert engine.adapters.evictions > 0
    # some decode steps with adapters reused the plan, and not all
    assert 0 < engine.slots.plans_built < calls["decode_forward"]
    layers = CpuBackend(native=True, decode_stack=False)
    engine = engine_with(tiny_llama_dir, lora_dirs, dtype="bfloat16", max_loras=2, backend=layers)
    assert adapter_tokens(engine.generate(requests(names, seed=5))) == one_call


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_matrix_vector_kernel_gives_onednns_tokens(model, request):
    """bf16 steps of up to gemv.GEMV_MAX_ROWS rows (every step) read the matrix-vector
    kernel's layout (kernels/gemv.py), through the one-call stack and the Python layers alike;
    the greedy tokens are those of oneDNN at every batch size (gemv_rows=0)."""
    require_packing()
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    path = request.getfixturevalue(model)
    onednn = run(path, "bfloat16", CpuBackend(native=True, gemv_rows=0))
    assert sum(len(t) for t in onednn.values()) > 100
    assert run(path, "bfloat16", CpuBackend(native=True)) == onednn
    assert run(path, "bfloat16", CpuBackend(native=True, decode_stack=False)) == onednn
    # steps of up to 4 rows on the kernel, larger ones on oneDNN (both layouts held)
    assert run(path, "bfloat16", CpuBackend(native=True, gemv_rows=4)) == onednn
    # the weights in their own allocations instead of one buffer of huge pages
    assert run(path, "bfloat16", CpuBackend(native=True, huge_pages=False)) == onednn


def test_the_cpu_backend_holds_the_matrix_vector_layout_in_bf16_only(tiny_llama_dir):
    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    config, state = load_config(tiny_llama_dir), load_state_dict(tiny_llama_dir)
    model = LlamaModel(config, state, torch.bfloat16, CPU, CpuBackend(native=True))
    lin = model.layers[0].qkv
    # one copy of each weight: the kernel serves every step (gemv.GEMV_MAX_ROWS)
    assert lin.gemv is not None and model.lm_head_gemv is not None and lin.weight is None
    assert lin.packed is None and model.lm_head_packed is None
    assert lin.matmul_weight(1) is lin.gemv and lin.matmul_weight(512) is lin.gemv
    dense = LlamaModel(config, state, torch.bfloat16, CPU, Backend())
    assert torch.equal(lin.dense_weight(), dense.layers[0].qkv.weight)
    assert torch.equal(model.lm_head_dense(), dense.lm_head_dense())
    # every streamed weight a view into one buffer (kernels/huge_pages.py), in step order
    streamed = [w for layer in model.layers for w in (layer.qkv.gemv, layer.o.gemv,
                                                      layer.gate_up.gemv, layer.down.gemv)]
    streamed.append(model.lm_head_gemv)
    buffers = {w.untyped_storage().data_ptr() for w in streamed}
    assert len(buffers) == 1
    assert [w.data_ptr() for w in streamed] == sorted(w.data_ptr() for w in streamed)
    apart = LlamaModel(config, state, torch.bfloat16, CPU, CpuBackend(native=True,
                                                                      huge_pages=False))
    assert apart.layers[0].qkv.gemv.untyped_storage().data_ptr() != \
        apart.layers[0].o.gemv.untyped_storage().data_ptr()
    assert torch.equal(apart.layers[0].qkv.gemv, lin.gemv)
    fp32 = LlamaModel(config, state, torch.float32, CPU, CpuBackend(native=True))
    assert fp32.layers[0].qkv.gemv is None and fp32.lm_head_gemv is None
