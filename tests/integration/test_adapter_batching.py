"""Heterogeneous batches: every kind in one batch, each request's tokens as if it ran alone;
residency under slot pressure; unregister / replace while requests run."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from peftserve.adapters.errors import AdapterExists, AdapterNotFound
from peftserve.config import EngineConfig
from peftserve.engine import async_engine
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import FinishReason
from peftserve.layers.backend import Backend
from tests import adapters as A
from tests.device import DEVICE
from tests.outcomes import served

PROMPTS = [
    "the quick brown fox",
    "hello world, how are you today?",
    "low rank",
    "0 1 2 3",
    "positive negative neutral",
    "jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora-r2": A.make_lora(tiny_llama_dir, root / "lora-r2", r=2, seed=1),
        "lora-r8": A.make_lora(tiny_llama_dir, root / "lora-r8", r=8, seed=2, targets=A.ALL_LINEAR),
        "lora-r32": A.make_lora(
            tiny_llama_dir,
            root / "lora-r32",
            r=32,
            seed=3,
            targets=["k_proj", "o_proj", "down_proj"],
        ),
        "houlsby": A.make_bottleneck(tiny_llama_dir, root / "houlsby", "houlsby", seed=4),
        "pfeiffer": A.make_bottleneck(tiny_llama_dir, root / "pfeiffer", "pfeiffer", seed=5),
        "prefix": A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=6, seed=6),
        "prompt": A.make_prompt_tuning(tiny_llama_dir, root / "prompt", virtual=3, seed=7),
        "template": A.make_template(
            root / "template", system="Be brief.", few_shot=[{"user": "hi", "assistant": "hello"}]
        ),
    }


def engine_with(model_dir, dirs, backend: Backend | None = None, **kw) -> Engine:
    kw = {"dtype": "float32", "num_kv_blocks": 256, "block_size": 4, "max_loras": 8, **kw}
    engine = Engine.from_config(EngineConfig(model=str(model_dir), device=DEVICE, **kw), backend)
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    return engine


def requests(names: list[str | None], seed: int = 0) -> list[Request]:
    reqs = []
    for i, name in enumerate(names):
        params = SamplingParams(max_new_tokens=6 + (i * 5 + seed) % 14, ignore_eos=True)
        reqs.append(
            Request(
                f"{name or 'base'}-{i}",
                prompt=PROMPTS[i % len(PROMPTS)],
                adapter=name,
                params=params,
            )
        )
    return reqs


def tokens(results) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in results.items()}


def run_alone(engine: Engine, reqs: list[Request]) -> dict[str, list[int]]:
    out = {}
    for r in reqs:
        out.update(tokens(engine.generate([r])))
    return out


MIX = [
    None,
    "lora-r2",
    "lora-r8",
    "lora-r32",
    "houlsby",
    "pfeiffer",
    "prefix",
    "prompt",
    "template",
]


def test_every_kind_in_one_batch_matches_running_alone(tiny_llama_dir, adapter_dirs):
    engine = engine_with(tiny_llama_dir, adapter_dirs)
    reqs = requests(MIX * 2)
    alone = run_alone(engine, reqs)
    for r in reqs:
        engine.add_request(r)
    results: dict[str, list] = {r.request_id: [] for r in reqs}
    biggest = 0
    while engine.has_unfinished():
        for o in engine.step():
            results[o.request_id].append(o)
        biggest = max(biggest, engine.last_batch_size)
    assert biggest == len(reqs)  # all 18 requests, 9 kinds/adapters, shared one step
    assert tokens(results) == alone
    # Adapters do change the output: a LoRA request differs from the base on the same prompt.
    assert (
        alone["lora-r8-2"]
        != run_alone(engine, [Request("x", prompt=PROMPTS[2], params=reqs[2].params)])["x"]
    )
    assert engine.block_manager.num_used == sum(
        len(e.prefix.blocks) for e in engine.registry.entries() if e.prefix is not None
    )


def test_two_slots_five_adapters_all_complete_and_pinned_slots_survive(
    tiny_llama_dir, adapter_dirs
):
    names = ["lora-r2", "lora-r8", "lora-r32", "houlsby", "pfeiffer"]
    dirs = {n: adapter_dirs[n] for n in names}
    alone = run_alone(engine_with(tiny_llama_dir, dirs), requests(names * 2, seed=1))
    engine = engine_with(tiny_llama_dir, dirs, max_loras=2)
    reqs = requests(names * 2, seed=1)
    for r in reqs:
        engine.add_request(r)
    results: dict[str, list] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            results[o.request_id].append(o)
        running = [s for s in engine.scheduler.running if s.adapter is not None]
        # Never more adapters on the device than slots, and every running one holds its slot.
        assert len({s.adapter.name for s in running}) <= 2
        for s in running:
            assert s.slot >= 0 and engine.adapters.slot_owner[s.slot] is s.adapter
    assert tokens(results) == alone
    assert engine.adapters.evictions > 0


def test_cold_adapters_reload_from_disk_when_host_tier_is_small(tiny_llama_dir, adapter_dirs):
    names = ["lora-r2", "lora-r8", "prefix", "prompt"]
    dirs = {n: adapter_dirs[n] for n in names}
    alone = run_alone(engine_with(tiny_llama_dir, dirs), requests(names))
    engine = engine_with(tiny_llama_dir, dirs, max_cpu_adapters=1, max_loras=1)
    assert sum(1 for e in engine.registry.entries() if e.loaded is None) == 3
    assert tokens(engine.generate(requests(names))) == alone
    assert engine.registry.loads > len(names)  # some came back from disk


def test_the_server_loop_steps_as_soon_as_a_reload_ends(tiny_llama_dir, adapter_dirs, monkeypatch):
    """While only adapter loads are in flight the server's engine loop waits; a load's end
    wakes it (AdapterRegistry.on_loaded), not the next poll. The poll is made 60 s here: a
    request whose adapter comes back from disk must still finish in well under that."""
    monkeypatch.setattr(async_engine, "LOADING_POLL_S", 60.0)
    names = ["lora-r2", "lora-r8"]
    engine = engine_with(tiny_llama_dir, {n: adapter_dirs[n] for n in names},
                         max_cpu_adapters=1, max_loras=1)  # fmt: skip
    cold = next(e.name for e in engine.registry.entries() if e.loaded is None)
    req = Request("cold", prompt="hello", adapter=cold,
                  params=SamplingParams(max_new_tokens=3, ignore_eos=True))  # fmt: skip

    async def main(aeng):
        t0 = time.monotonic()
        outs = [o async for o in aeng.generate(req)]
        return outs, time.monotonic() - t0

    loads = engine.registry.loads
    outs, seconds = served(engine, main)
    assert engine.registry.loads > loads  # it came back from disk
    assert outs[-1].finished and outs[-1].completion_tokens == 3
    assert seconds < 20, seconds


def test_unregister_in_use_lets_running_requests_finish(tiny_llama_dir, adapter_dirs):
    engine = engine_with(
        tiny_llama_dir, {"lora-r8": adapter_dirs["lora-r8"], "prefix": adapter_dirs["prefix"]}
    )
    reqs = requests(["lora-r8", "prefix"])
    alone = run_alone(engine, reqs)
    for r in reqs:
        engine.add_request(r)
    results: dict[str, list] = {r.request_id: [] for r in reqs}
    for o in engine.step():
        results[o.request_id].append(o)
    engine.adapters.unregister("lora-r8")
    engine.adapters.unregister("prefix")
    with pytest.raises(AdapterNotFound):
        engine.add_request(Request("late", prompt="hi", adapter="lora-r8"))
    while engine.has_unfinished():
        for o in engine.step():
            results[o.request_id].append(o)
    assert tokens(results) == {k: v for k, v in alone.items()}
    assert all(o[-1].finish_reason is FinishReason.LENGTH for o in results.values())
    assert engine.block_manager.num_used == 0
    assert engine.adapters.slot_owner == [None] * engine.config.max_loras
    assert engine.adapters.infos() == []


def test_replace_swaps_for_new_requests_without_breaking_running_ones(tiny_llama_dir, adapter_dirs):
    engine = engine_with(tiny_llama_dir, {"a": adapter_dirs["lora-r2"]})
    old = requests(["a"])[0]
    expected_old = run_alone(engine, [old])
    with pytest.raises(AdapterExists):
        engine.adapters.register("a", adapter_dirs["lora-r8"])
    engine.add_request(old)
    results: dict[str, list] = {old.request_id: [], "new": []}
    for o in engine.step():
        results[o.request_id].append(o)
    engine.adapters.register("a", adapter_dirs["lora-r8"], replace=True)
    new = Request("new", prompt=old.prompt, adapter="a", params=old.params)
    engine.add_request(new)
    while engine.has_unfinished():
        for o in engine.step():
            results[o.request_id].append(o)
    got = tokens(results)
    assert got[old.request_id] == expected_old[old.request_id]
    reference = engine_with(tiny_llama_dir, {"a": adapter_dirs["lora-r8"]})
    assert got["new"] == run_alone(reference, [new])["new"]
    assert engine.adapters.info("a").ranks["q"] == 8


def test_adapter_whose_files_vanish_fails_only_its_own_request(
    tiny_llama_dir, adapter_dirs, tmp_path
):
    path = shutil.copytree(adapter_dirs["lora-r2"], tmp_path / "gone")
    engine = engine_with(tiny_llama_dir, {"gone": path}, max_cpu_adapters=1)
    engine.adapters.register("another", adapter_dirs["lora-r8"])  # evicts "gone" from host memory
    shutil.rmtree(path)
    reqs = requests(["gone", None])
    results = engine.generate(reqs)
    failed = results[reqs[0].request_id][-1]
    assert failed.finish_reason is FinishReason.ABORT and "failed to load" in failed.error
    assert results[reqs[1].request_id][-1].finish_reason is FinishReason.LENGTH
    assert engine.block_manager.num_used == 0


def test_loads_run_off_the_engine_thread_with_one_torch_thread(
    tiny_llama_dir, adapter_dirs, monkeypatch
):
    """A loader thread whose torch ops go parallel gets an OpenMP team of its own, competing
    with the engine thread's for the cores: loads run with one torch thread, and leave the
    engine thread's count alone."""
    engine = engine_with(tiny_llama_dir, {})
    before = torch.get_num_threads()
    seen = []

    def load(directory):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return A.__name__

    monkeypatch.setattr(engine.registry, "load_from_disk", load)
    engine.registry.submit_load(adapter_dirs["lora-r2"]).result()
    assert seen and seen[0][0].startswith("adapter-load") and seen[0][1] == 1
    assert torch.get_num_threads() == before
