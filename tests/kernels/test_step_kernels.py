"""The kernels a captured decode step launches, counted (tests/kernel_census.py): the static
decode step in the form its CUDA graphs capture (tests/eager_graphs.py), on the Triton backend.
Inside a graph each launch is a node the GPU runs in turn, a few microseconds each however
small, so at the bandwidth floor (the issue's target: 1.25x of one pass over the weights) every
kernel a layer adds costs ~1-2% of an 8B step. A decoder layer is its four matmuls and six
fused kernels (two RMSNorms, each with the residual add before it; rotary + the K/V write;
SiLU-and-mul; paged attention and its merge across splits), plus two per adapted projection
(shrink, expand); anything else that appears here is an op a graph replays every step."""

from __future__ import annotations

from collections import Counter

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.layers.triton_backend import TritonBackend
from tests import adapters as A
from tests.eager_graphs import EagerBuckets
from tests.kernel_census import KernelCensus
from tests.kernels.lowrank_cases import KERNEL_DEVICE
from tests.tiny import make_model_dir

LAYER = Counter({
    "aten.linear": 4,  # qkv, o, gate_up, down
    "triton:_rms_norm_kernel": 2,  # with the residual add before it
    "triton:_rotary_cache_kernel": 1,
    "triton:_paged_decode_kernel": 1,
    "triton:_merge_splits_kernel": 1,
    "triton:_silu_and_mul_kernel": 1,
})  # fmt: skip
STEP = Counter({
    "aten.embedding": 1,
    "aten.index_select": 2,  # the rows' cos and sin
    "triton:_rms_norm_kernel": 1,  # the last layer's residual add and the final norm
    "aten.linear": 1,  # the LM head, its fp32 conversion in the copy to the logits buffer
    "aten.copy_": 3,  # that copy; the sampled ids and logprobs into the output buffer
    "aten.argmax": 1,
    "aten.log_softmax": 1,
    "aten.gather": 1,
})  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("step-kernels")
    out = {}
    for layers in (1, 2):
        model = make_model_dir(root / f"model{layers}", num_hidden_layers=layers)
        lora = A.make_lora(model, root / f"lora{layers}", r=8, seed=1, targets=A.ALL_LINEAR)
        out[layers] = (model, lora)
    return out


def census(model, lora, adapter: str | None) -> Counter:
    """The kernels of one captured-form decode step of three greedy rows (padded to 4), in
    bf16 as the GPU serves (in fp32 a conversion to fp32 would launch nothing)."""
    backend = TritonBackend()
    backend.captures_graphs = False  # the captured form, run eagerly (tests/eager_graphs.py)
    config = EngineConfig(model=str(model), dtype="bfloat16", device=KERNEL_DEVICE, block_size=4,
                          num_kv_blocks=160, max_loras=2, max_model_len=600,
                          decode_step="static")  # fmt: skip
    engine = Engine.from_config(config, backend)
    engine.adapters.register("lora", lora)
    counted = KernelCensus()
    buckets = EagerBuckets.install(engine, 4, lambda: counted)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)  # a prefill, then one decode
    engine.generate([Request(f"r{i}", prompt="the quick brown fox", adapter=adapter,
                             params=params) for i in range(3)])  # fmt: skip
    assert buckets.replays == 1
    return counted.counts


def test_a_decode_layer_is_its_matmuls_and_fused_kernels(models):
    one, two = census(*models[1], None), census(*models[2], None)
    # the captured width spans several 256-position splits: the attention merges them
    assert two - one == LAYER
    assert one - LAYER == STEP and not LAYER - one


def test_each_adapted_projection_adds_two_launches(models):
    one, two = census(*models[1], "lora"), census(*models[2], "lora")
    lora = Counter({"triton:_shrink_rows_kernel": 4, "triton:_expand_rows_kernel": 4})
    assert two - one == LAYER + lora
    assert one - LAYER - lora == STEP
