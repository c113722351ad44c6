"""One request's adapter never fails another request: a failure while preparing an adapter
(its slot write) ends that adapter's requests alone, and the batch around them goes on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from peftserve.adapters.lora import LoraModule, LoraWeights
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import FinishReason
from tests import adapters as A
from tests.device import DEVICE
from tests.outcomes import assert_failed_alone


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory) -> Engine:
    engine = Engine.from_config(EngineConfig(model=str(tiny_llama_dir), device=DEVICE,
                                             dtype="float32", num_kv_blocks=128, max_loras=4))
    path = A.make_lora(tiny_llama_dir, tmp_path_factory.mktemp("lora") / "good", r=4)
    engine.adapters.register("good", path)
    # What a config of lora_alpha 1e308 used to become: registration now refuses such files, so
    # the weights are built here and handed over as already read.
    loaded = engine.registry.load_from_disk(path)
    bad = LoraWeights({k: LoraModule(m.A, m.B, 1e308) for k, m in loaded.lora.modules.items()})
    engine.adapters.add_loaded("overflow", replace(loaded, lora=bad), path)
    return engine


def test_a_bad_adapter_fails_its_requests_alone(engine):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    names = [None] * 12 + ["overflow", "good", "overflow"]
    reqs = [Request(f"r{i}", prompt="the quick brown fox", adapter=n, params=params)
            for i, n in enumerate(names)]
    outs = engine.generate(reqs)
    assert_failed_alone(outs, reqs, "overflow", new_tokens=5)
    # Nothing stays held: no slot owned by the bad adapter, no KV block in use.
    assert engine.adapters.info("overflow").residency != "device"
    assert engine.block_manager.num_used == 0
    # The good adapter still serves, and so does the base model.
    again = engine.generate([Request("after", prompt="hi", adapter="good", params=params)])
    assert again["after"][-1].finish_reason is FinishReason.LENGTH


@pytest.fixture()
def evicted(tiny_llama_dir, tmp_path):
    """An engine holding one adapter in host memory: registering `b` evicts `a` to disk, so
    the next request for `a` reloads its files."""
    root = tmp_path / "root"
    engine = Engine.from_config(EngineConfig(model=str(tiny_llama_dir), device=DEVICE,
                                             dtype="float32", num_kv_blocks=64,
                                             max_cpu_adapters=1))
    a = A.make_lora(tiny_llama_dir, root / "a", r=4, seed=1)
    engine.adapters.register("a", a)
    engine.adapters.register("b", A.make_lora(tiny_llama_dir, root / "b", r=4, seed=2))
    assert engine.adapters.info("a").residency == "disk"
    return engine, a, tmp_path


def outcome(engine: Engine, adapter: str) -> tuple[str | None, str | None]:
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    outs = engine.generate([Request("x", prompt="hello", adapter=adapter, params=params),
                            Request("base", prompt="hello", params=params)])
    assert outs["base"][-1].finish_reason is FinishReason.LENGTH  # never caught up in it
    return outs["x"][-1].error, outs["x"][-1].finish_reason


def test_a_reload_with_changed_weights_fails_that_adapters_requests(evicted, tiny_llama_dir):
    engine, a, tmp_path = evicted
    other = A.make_lora(tiny_llama_dir, tmp_path / "same-shapes", r=4, seed=3)
    (a / "adapter_model.safetensors").write_bytes(
        (other / "adapter_model.safetensors").read_bytes())
    error, reason = outcome(engine, "a")
    assert reason is FinishReason.ABORT and "changed on disk since" in error
    assert engine.adapters.info("a").residency == "disk"  # the new weights were never served
    error, reason = outcome(engine, "b")
    assert error is None and reason is FinishReason.LENGTH


def test_a_reload_through_a_link_out_of_the_root_is_refused(evicted):
    engine, a, tmp_path = evicted
    weights = a / "adapter_model.safetensors"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(weights.read_bytes())  # the same bytes: the link alone is refused
    weights.unlink()
    weights.symlink_to(outside)
    error, reason = outcome(engine, "a")
    assert reason is FinishReason.ABORT and "leads to another file" in error


def test_an_unchanged_adapter_reloads_and_serves(evicted):
    engine, _, _ = evicted
    error, reason = outcome(engine, "a")
    assert error is None and reason is FinishReason.LENGTH
