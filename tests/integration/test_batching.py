"""Continuous batching: a request's greedy tokens do not depend on who shares its batch, even
under preemption; every KV block comes back."""

from __future__ import annotations

import random

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import FinishReason
from tests.device import DEVICE
from tests.tiny import CORPUS

WORDS = " ".join(CORPUS[:5]).split()


def make_requests(n: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        params = SamplingParams(max_new_tokens=rng.randint(1, 40), ignore_eos=True)
        reqs.append(Request(f"r{i}", prompt=prompt, params=params))
    return reqs


def engine(path, **kw) -> Engine:
    kw.setdefault("num_kv_blocks", 256)
    return Engine.from_config(
        EngineConfig(model=str(path), dtype="float32", device=DEVICE, block_size=4, **kw)
    )


def tokens(results) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in results.items()}


@pytest.fixture(scope="module")
def alone(tiny_llama_dir) -> dict[str, list[int]]:
    eng = engine(tiny_llama_dir)
    out = {}
    for r in make_requests(16):
        out.update(tokens(eng.generate([r])))
    return out


def test_sixteen_concurrent_requests_match_running_alone(tiny_llama_dir, alone):
    eng = engine(tiny_llama_dir, max_num_batched_tokens=64)
    reqs = make_requests(16)
    # Stagger arrivals so prefills join running decodes (continuous batching).
    for r in reqs[:6]:
        eng.add_request(r)
    results: dict[str, list] = {r.request_id: [] for r in reqs}
    pending = reqs[6:]
    max_batch = 0
    while eng.has_unfinished() or pending:
        if pending and eng.steps % 2 == 0:
            eng.add_request(pending.pop(0))
        for o in eng.step():
            results[o.request_id].append(o)
        max_batch = max(max_batch, len(eng.scheduler.running))
    assert max_batch >= 8
    assert tokens(results) == alone
    for r in reqs:
        assert len(alone[r.request_id]) == r.params.max_new_tokens
    assert eng.block_manager.num_used == 0


# static: the decode step from persistent buffers, its block-table rows mirrored across steps
# (a preempted sequence's table is freed and allocated anew)
@pytest.mark.parametrize("decode_step", ["auto", "static"])
def test_preemption_by_recompute_keeps_outputs(tiny_llama_dir, alone, decode_step):
    # 24 blocks x 4 tokens: far less than 16 requests need, so running sequences get preempted.
    eng = engine(tiny_llama_dir, num_kv_blocks=24, max_num_batched_tokens=32,
                 decode_step=decode_step)  # fmt: skip
    reqs = make_requests(16)
    seqs = [eng.add_request(r) for r in reqs]
    results: dict[str, list] = {r.request_id: [] for r in reqs}
    while eng.has_unfinished():
        for o in eng.step():
            results[o.request_id].append(o)
    assert tokens(results) == alone
    assert eng.block_manager.num_used == 0
    assert sum(s.num_preemptions for s in seqs) > 0


def test_blocks_all_free_after_finished_stopped_aborted_preempted(tiny_llama_dir):
    eng = engine(tiny_llama_dir, num_kv_blocks=20, max_num_batched_tokens=16)
    reqs = make_requests(12, seed=1)
    stop_tok = Request(
        "stop-token",
        prompt="hello world",
        params=SamplingParams(max_new_tokens=40, ignore_eos=True, stop_token_ids=tuple(range(400))),
    )
    seqs = [eng.add_request(r) for r in reqs] + [eng.add_request(stop_tok)]
    finished = set()
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished.add(o.request_id)
        steps += 1
        if steps == 5:
            assert eng.abort("r3") is not None
            assert eng.abort("r11") is not None
    assert sum(s.num_preemptions for s in seqs) > 0
    reasons = {s.request_id: s.finish_reason for s in seqs}
    assert reasons["stop-token"] is FinishReason.STOP
    assert reasons["r3"] is FinishReason.ABORT or "r3" in finished
    assert eng.block_manager.num_used == 0
    assert all(rc == 0 for rc in eng.block_manager.refcount)
    assert not eng.scheduler.running and not eng.scheduler.waiting
