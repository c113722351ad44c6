"""`schedule()` only decides; the engine step writes what the decision needs (an adapter's
weights into its slot, a shared prefix's KV into its blocks) before it runs the batch, and a
failure there ends the requests that needed that write, and no other."""

from __future__ import annotations

from dataclasses import replace

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.outcomes import assert_failed_alone

PARAMS = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": A.make_lora(tiny_llama_dir, root / "lora", r=4),
        "prefix": A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=5),
        "prompt": A.make_prompt_tuning(tiny_llama_dir, root / "prompt", virtual=4),
    }


def _engine(model_dir) -> Engine:
    return Engine.from_config(EngineConfig(model=str(model_dir), dtype="float32",
                                           num_kv_blocks=64, block_size=4, max_loras=2))


def test_schedule_decides_and_the_step_writes(tiny_llama_dir, dirs):
    engine = _engine(tiny_llama_dir)
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    for name in dirs:
        engine.add_request(Request(name, prompt="the quick brown fox", adapter=name,
                                   params=PARAMS))
    kv = engine.runner.kv_cache.clone()
    version = engine.slots.version
    batch = engine.scheduler.schedule()
    assert len(batch) == 3
    assert engine.slots.version == version  # the LoRA's slot is chosen, not written
    assert engine.adapters.info("lora").residency == "device"
    assert engine.runner.kv_cache.equal(kv)  # the prefixes' blocks are taken, not filled
    assert engine.adapters.prepare([item.seq for item in batch.items]) == []
    assert engine.slots.version > version
    assert not engine.runner.kv_cache.equal(kv)


def _tokens(engine: Engine, reqs: list[Request]) -> dict[str, list[int]]:
    outs = engine.generate(reqs)
    return {rid: [t for o in got for t in o.token_ids] for rid, got in outs.items()}


def test_a_prefix_that_cannot_be_written_fails_its_requests_alone(tiny_llama_dir, dirs):
    engine = _engine(tiny_llama_dir)
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    loaded = engine.registry.load_from_disk(dirs["prefix"])
    assert loaded.prefix_kv is not None
    # A head_dim one too small: what a loader bug would hand over. Registration checks files, so the
    # weights are handed over as already read; writing them into the cache raises.
    bad = loaded.prefix_kv[..., :-1].contiguous()
    engine.adapters.add_loaded("broken", replace(loaded, prefix_kv=bad), dirs["prefix"])
    names = [None, "broken", "lora", "prefix", "broken", "prompt", None]
    reqs = [Request(f"r{i}", prompt="the quick brown fox", adapter=n, params=PARAMS)
            for i, n in enumerate(names)]
    outs = engine.generate(reqs)
    assert_failed_alone(outs, reqs, "broken", new_tokens=PARAMS.max_new_tokens)
    # Nothing is held: the failed prefix's blocks came back, and the good prefixes are idle.
    assert engine.adapters.info("broken").residency != "device"
    idle_prefix_blocks = sum(
        len(e.prefix.blocks) for e in engine.registry.entries() if e.prefix is not None
    )
    assert engine.block_manager.num_used == idle_prefix_blocks
    # The others' tokens are what they are with no failing request beside them.
    alone = _tokens(_engine_with(tiny_llama_dir, dirs),
                    [r for r in reqs if r.adapter != "broken"])
    got = {rid: [t for o in outs[rid] for t in o.token_ids] for rid in alone}
    assert got == alone


def _engine_with(model_dir, dirs) -> Engine:
    engine = _engine(model_dir)
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    return engine
