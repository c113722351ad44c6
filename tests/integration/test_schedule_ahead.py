"""Decode steps scheduled ahead (Engine.step, config.schedule_ahead): where decode steps replay
CUDA graphs, the next decode step is queued before this one's tokens are back, its input ids
read on the device. Here the static decode step in its captured form (tests/eager_graphs.py)
stands in for the graphs, and runs in the calling thread: the step ahead computes at once what
the GPU would compute later, so every output must equal the outputs with each step scheduled
after the last one's tokens: the rows of sequences that ended meanwhile dropped, the length
limits and the KV blocks as the scheduler would have them, an abort honoured."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from peftserve.engine.engine import Engine
from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.integration.test_overlap_outputs import content, engine_for, mixed_requests, run


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return A.every_kind(tiny_llama_dir, tmp_path_factory.mktemp("ahead"),
                        ("lora", "bottleneck", "prefix", "prompt"))  # fmt: skip


def counting(engine: Engine) -> dict[str, int]:
    """Counts, as the engine runs: steps launched ahead, their rows, and the rows dropped
    because their sequence ended before the step was taken."""
    counts = {"launched": 0, "rows": 0, "dropped": 0}
    launch_ahead, take = engine.runner.launch_ahead, engine._take_ahead

    def launching(decodes, feed):
        wait = launch_ahead(decodes, feed)  # (one that raises is not counted)
        counts["launched"] += 1
        counts["rows"] += len(decodes)
        return wait

    def taking():
        ahead = engine._ahead
        taken = take()
        if ahead is not None:
            counts["dropped"] += len(ahead[0].decodes) - (0 if taken is None else len(taken[0]))
        return taken

    engine.runner.launch_ahead, engine._take_ahead = launching, taking
    return counts


@pytest.mark.parametrize("overlap", [True, False])
def test_steps_scheduled_ahead_give_the_same_outputs(tiny_llama_dir, adapter_dirs, overlap):
    """Every ending (length, EOS, stop string, stop token), greedy and seeded draws, logprobs,
    four adapter kinds (prompt tuning's virtual tokens shift its positions) and none, late
    arrivals."""
    reqs = [replace(r, params=replace(r.params, max_new_tokens=3 * r.params.max_new_tokens))
            for r in mixed_requests()]  # fmt: skip
    reqs.append(Request("virtual", prompt="low rank adapters", adapter="prompt",
                        params=SamplingParams(max_new_tokens=14, ignore_eos=True, logprobs=True,
                                              temperature=0.7, seed=9)))  # fmt: skip
    # repetition penalties: the history of a step ahead holds the newest token (on the device)
    for i, temperature in enumerate((0.0, 0.9)):
        reqs.insert(2 + i, Request(f"penalty{i}", prompt="the quick brown fox",
                                   params=SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                         repetition_penalty=1.5, seed=4,
                                                         temperature=temperature)))  # fmt: skip
    ref = engine_for(tiny_llama_dir, adapter_dirs, overlap, schedule_ahead=False)
    # one more stops on a token it samples late, once every request has arrived
    free = [t for o in run(ref, reqs)["6"] for t in o.token_ids]
    reqs[6] = replace(reqs[6], params=replace(reqs[6].params, stop_token_ids=(free[6],)))
    plain = run(ref, reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap)
    counts = counting(engine)
    ahead = run(engine, reqs)
    assert content(ahead) == content(plain)
    # most tokens came from steps ahead, and rows ended under a step ahead
    tokens = sum(len(o.token_ids) for outs in ahead.values() for o in outs)
    assert counts["rows"] - counts["dropped"] > tokens // 2, (counts, tokens)
    assert counts["dropped"] > 0, counts
    stats = engine.stats()  # what the metrics report (peftserve_engine_steps_ahead, ...)
    assert (stats.steps_ahead, stats.ahead_rows_dropped) == (counts["launched"], counts["dropped"])
    assert stats.steps > stats.steps_ahead


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kw)


def outputs_of(engine: Engine, rid: str, outs: list[RequestOutput]) -> list[int]:
    mine = [o for o in outs if o.request_id == rid]
    assert mine[-1].finished and not any(o.finished for o in mine[:-1]), rid
    return [t for o in mine for t in o.token_ids]


def test_an_abort_while_its_step_runs_ahead(tiny_llama_dir, adapter_dirs):
    prompt = "the quick brown fox"
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True)
    seqs = {rid: engine.add_request(Request(rid, prompt=prompt, params=greedy(12)))
            for rid in ("a", "b")}  # fmt: skip
    got: list[RequestOutput] = []
    while engine._ahead is None:
        got += engine.step(emit=got.extend)
    assert any(d.seq is seqs["a"] for d in engine._ahead[0].decodes)
    final = engine.abort("a")
    assert final is not None and final.finished
    new = engine.add_request(Request("a", prompt="low rank", params=greedy(2)))
    after: list[RequestOutput] = []
    while engine.has_unfinished():
        after += engine.step(emit=after.extend)
    ref = engine_for(tiny_llama_dir, adapter_dirs, overlap=True, schedule_ahead=False)
    want = ref.generate([Request("b", prompt=prompt, params=greedy(12)),
                         Request("a", prompt="low rank", params=greedy(2))])  # fmt: skip
    b_tokens = outputs_of(engine, "b", got + after)
    assert b_tokens == seqs["b"].output_token_ids == outputs_of(ref, "b", want["b"])
    assert outputs_of(engine, "a", after) == new.output_token_ids
    assert new.output_token_ids == outputs_of(ref, "a", want["a"])
    assert engine.block_manager.num_used == 0 and engine._ahead is None


def test_a_step_ahead_whose_every_row_ended_is_dropped(tiny_llama_dir, adapter_dirs):
    """The only request stops on a token while the step after it is queued: that step's tokens
    are dropped, and the next request is served as on a fresh engine."""
    prompt, later = "the quick brown fox", Request("c", prompt="low rank", params=greedy(5))
    ref = engine_for(tiny_llama_dir, adapter_dirs, overlap=False, schedule_ahead=False)
    drawn = greedy(8, temperature=1.0, seed=3)  # (greedy, the tiny model repeats one token)
    free_run = outputs_of(ref, "x", ref.generate([Request("x", prompt=prompt, params=drawn)])["x"])
    stop = free_run[4]
    assert free_run.index(stop) >= 3  # the first two decode steps: a plain one, one ahead
    stopping = Request("s", prompt=prompt, params=replace(drawn, stop_token_ids=(stop,)))
    want = ref.generate([stopping])["s"]
    want_later = ref.generate([later])["c"]
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True)
    counts = counting(engine)
    got = engine.generate([stopping])["s"]
    assert engine._ahead is not None and not engine.has_unfinished()  # queued, all ended
    assert content({"s": got}) == content({"s": want})
    assert content({"c": engine.generate([later])["c"]}) == content({"c": want_later})
    assert counts["dropped"] >= 1 and engine.block_manager.num_used == 0


@pytest.mark.parametrize("case", ["waiting", "blocks"])
def test_no_step_goes_ahead_when_the_scheduler_must_decide(tiny_llama_dir, adapter_dirs, case):
    """A request that waits and could be admitted, too few free KV blocks (the scheduler
    preempts): the next step is scheduled after this one's tokens, with the same outputs as
    without."""
    kw: dict = {}
    reqs = [Request(f"r{i}", prompt=" ".join(["the quick brown fox"] * (1 + i)),
                    params=greedy(10)) for i in range(3)]  # fmt: skip
    if case == "waiting":
        kw = {"max_num_batched_tokens": 12}  # one prompt a step: one waits while two decode
    if case == "blocks":
        kw = {"num_kv_blocks": 12}  # the three outgrow the cache: preemptions
    plain_engine = engine_for(tiny_llama_dir, {}, overlap=True, schedule_ahead=False, **kw)
    plain = plain_engine.generate(reqs)
    engine = engine_for(tiny_llama_dir, {}, overlap=True, **kw)
    counts = counting(engine)
    launched_while: list[int] = []  # requests waiting
    launch_ahead, preempt = engine.runner.launch_ahead, engine.scheduler._preempt
    preempted: list[str] = []

    def watching(decodes, feed):
        launched_while.append(len(engine.scheduler.waiting))
        return launch_ahead(decodes, feed)

    def preempting(seq):
        preempted.append(seq.request_id)
        preempt(seq)

    engine.runner.launch_ahead, engine.scheduler._preempt = watching, preempting
    got = engine.generate(reqs)
    assert content(got) == content(plain)
    assert counts["launched"] > 0  # once the scheduler's decision is known again
    assert all(waiting == 0 for waiting in launched_while)
    if case == "blocks":
        assert preempted and engine.block_manager.num_used == 0


def test_steps_go_ahead_while_a_waiting_request_s_adapter_loads(tiny_llama_dir, adapter_dirs):
    """A request that waits for its adapter to come back from disk could not be admitted
    anyway: the running ones go on ahead meanwhile, and it is admitted once the load ends."""
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True, max_cpu_adapters=1)
    cold = next(e.name for e in engine.registry.entries() if e.loaded is None)
    release, load = threading.Event(), engine.registry.load_from_disk

    def held_load(*args):
        release.wait(60)
        return load(*args)

    engine.registry.load_from_disk = held_load
    counts = counting(engine)
    reqs = [Request(rid, prompt="the quick brown fox", params=greedy(24)) for rid in "ab"]
    late = Request("c", prompt="low rank", adapter=cold, params=greedy(4))
    got: dict[str, list[RequestOutput]] = {r: [] for r in "abc"}

    def step() -> None:
        for out in engine.step():
            got[out.request_id].append(out)

    for r in reqs:
        engine.add_request(r)
    while counts["launched"] == 0:
        step()
    engine.add_request(late)
    for _ in range(3):  # admission starts the load, then the steps go ahead again
        step()
    launched = counts["launched"]
    for _ in range(4):
        step()
    assert counts["launched"] == launched + 4 and engine.scheduler.waiting  # ahead, c waits
    release.set()
    while engine.has_unfinished():
        step()
    ref = engine_for(tiny_llama_dir, adapter_dirs, overlap=True, schedule_ahead=False)
    want = ref.generate([*reqs, late])
    for rid in "abc":
        assert outputs_of(engine, rid, got[rid]) == outputs_of(ref, rid, want[rid]), rid


def test_a_step_ahead_that_fails_to_launch_leaves_the_steps_after(tiny_llama_dir, adapter_dirs,
                                                                   caplog):  # fmt: skip
    """Whatever makes a step ahead fail to launch (a bug on some device) is logged once, and
    the engine serves on with each step scheduled after the last one's tokens."""
    reqs = mixed_requests()
    plain = run(engine_for(tiny_llama_dir, adapter_dirs, True, schedule_ahead=False), reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, True)
    step, calls = engine.runner.static, []
    launch = step.launch

    def failing(decodes, feed=None):
        if feed is not None:
            calls.append(len(decodes))
            raise RuntimeError("no step ahead here")
        return launch(decodes, feed)

    step.launch = failing
    with caplog.at_level("WARNING"):
        got = run(engine, reqs)
    assert content(got) == content(plain)
    assert engine.ahead_failed and len(calls) == 1
    assert sum("no step ahead here" in r.getMessage() for r in caplog.records) == 1
