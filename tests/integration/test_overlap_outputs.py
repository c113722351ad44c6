"""Outputs made while the next step runs (Engine.step, config.overlap_outputs): where decode
steps replay CUDA graphs, a continuing sequence's output for its newest token is made during
the next step, between queuing its device work and waiting for it. Here the static decode step
in its captured form (tests/eager_graphs.py) stands in for the graphs: every request gets the
same outputs, in the same order and the same pieces, as without the overlap; the deferred
outputs are made before the step waits for the device; an aborted request gets nothing more; the
server's engine loop (AsyncEngine) streams them."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.eager_graphs import EagerBuckets
from tests.outcomes import leave_after, served, settled

WORDS = "the quick brown fox jumps over the lazy dog low rank adapters share a batch".split()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return A.every_kind(tiny_llama_dir, tmp_path_factory.mktemp("overlap"),
                        ("lora", "bottleneck", "prefix"))  # fmt: skip


def engine_for(model_dir, dirs, overlap: bool, graphs: bool = True, **kw) -> Engine:
    values = dict(model=str(model_dir), device="cpu", dtype="float32", block_size=4,
                  max_loras=4, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128,
                  decode_step="static", overlap_outputs=overlap)  # fmt: skip
    engine = Engine.from_config(EngineConfig(**{**values, **kw}))
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    if graphs:
        EagerBuckets.install(engine, 8)
    return engine


def mixed_requests(tag: str = "") -> list[Request]:
    """Every ending: length, EOS (not ignored), a stop string, a stop token; greedy, drawn
    with a seed, logprobs; adapters of three kinds and none."""
    kinds = (None, "lora", "bottleneck", "prefix")
    out = []
    for i in range(12):
        params = SamplingParams(
            max_new_tokens=3 + i % 6, ignore_eos=i % 4 != 0, logprobs=i % 2 == 0,
            temperature=0.8 if i % 3 == 2 else 0.0, top_k=30 if i % 3 == 2 else 0,
            seed=50 + i if i % 3 == 2 else None,
            stop=("e",) if i % 5 == 1 else (), stop_token_ids=(7,) if i % 5 == 3 else (),
        )  # fmt: skip
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 5))
        out.append(Request(f"{tag}{i}", prompt=prompt, adapter=kinds[i % 4], params=params))
    return out


def run(engine: Engine, reqs: list[Request]) -> dict[str, list[RequestOutput]]:
    """Every output of every request, in the order the engine made it (emitted or returned)."""
    got: dict[str, list[RequestOutput]] = {r.request_id: [] for r in reqs}

    def collect(outputs: list[RequestOutput]) -> None:
        for out in outputs:
            got[out.request_id].append(out)

    for r in reqs[:8]:
        engine.add_request(r)
    later = list(reqs[8:])
    while engine.has_unfinished() or later:
        collect(engine.step(emit=collect))
        if later:  # the rest arrive while the first decode
            engine.add_request(later.pop(0))
    return got


def content(outputs: dict[str, list[RequestOutput]]) -> dict[str, list[tuple]]:
    return {rid: [(o.text, o.token_ids, o.logprobs, o.finished, o.finish_reason,
                   o.completion_tokens, o.error) for o in outs]
            for rid, outs in outputs.items()}  # fmt: skip


def test_overlapped_outputs_are_the_same_outputs(tiny_llama_dir, adapter_dirs):
    reqs = mixed_requests()
    plain = run(engine_for(tiny_llama_dir, adapter_dirs, overlap=False), reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True)
    deferred = []
    pending_outputs = engine._pending_outputs

    def counting(emit):  # run() always passes one
        def seen(outputs):
            deferred.extend(outputs)
            emit(outputs)

        return pending_outputs(seen)

    engine._pending_outputs = counting
    overlapped = run(engine, reqs)
    assert len(deferred) > len(reqs)  # most outputs were made a step later
    assert content(overlapped) == content(plain)
    for rid, outs in overlapped.items():
        assert outs[-1].finished and not any(o.finished for o in outs[:-1]), rid
        assert outs[0].timings is not None and outs[0].timings.ttft_s is not None, rid
    # a sequence with stop strings is never deferred: its text decides whether it goes on
    assert not any(o.request_id in ("1", "6", "11") for o in deferred)


def test_deferred_outputs_are_made_before_the_step_waits_for_the_device(
    tiny_llama_dir, adapter_dirs
):  # fmt: skip
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True)
    events: list[str] = []

    def launching(launch):  # a step launched ahead (schedule_ahead) is launched too
        def launched(*args):
            wait = launch(*args)
            events.append("launched")

            def waiting():
                events.append("waited")
                return wait()

            return waiting

        return launched

    runner = engine.runner
    runner.launch, runner.launch_ahead = launching(runner.launch), launching(runner.launch_ahead)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for i in range(3):
        engine.add_request(Request(f"r{i}", prompt="the quick brown fox", params=params))
    while engine.has_unfinished():
        engine.step(emit=lambda outs: events.append(f"emitted {len(outs)}"))
    emitted = [i for i, e in enumerate(events) if e.startswith("emitted")]
    assert len(emitted) >= 3
    for i in emitted:  # while a step launched is not waited for, and just before a wait
        in_flight = events[:i].count("launched") - events[:i].count("waited")
        assert in_flight >= 1 and events[i + 1] == "waited", events


def test_an_aborted_request_gets_no_deferred_output(tiny_llama_dir, adapter_dirs):
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    seqs = {rid: engine.add_request(Request(rid, prompt="the quick brown fox", params=params))
            for rid in ("a", "b")}  # fmt: skip
    got: list[RequestOutput] = []
    while not engine._pending:
        got += engine.step(emit=got.extend)
    assert any(s.request_id == "a" for s in engine._pending)
    final = engine.abort("a")
    assert final is not None and final.finished
    # the id is free again: a new request under it must not get the old one's output
    new = engine.add_request(Request("a", prompt="low rank",
                                     params=replace(params, max_new_tokens=2)))  # fmt: skip
    after: list[RequestOutput] = []
    while engine.has_unfinished():
        after += engine.step(emit=after.extend)
    for rid, seq, outs in (("a", new, after), ("b", seqs["b"], got + after)):
        mine = [o for o in outs if o.request_id == rid]
        assert [t for o in mine for t in o.token_ids] == seq.output_token_ids, rid
        assert mine[-1].finished and not any(o.finished for o in mine[:-1]), rid
    assert len(new.output_token_ids) == 2 and len(seqs["b"].output_token_ids) == 12


def test_without_graphs_every_output_is_made_in_its_step(tiny_llama_dir, adapter_dirs):
    """On the CPU the step runs in the calling thread: nothing to overlap, nothing deferred."""
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True, graphs=False)
    reqs = mixed_requests()
    plain = run(engine_for(tiny_llama_dir, adapter_dirs, overlap=False), reqs)
    got = run(engine, reqs)
    assert not engine._pending and content(got) == content(plain)


def test_the_server_loop_streams_the_same_outputs_and_aborts_cleanly(tiny_llama_dir, adapter_dirs):
    """Through AsyncEngine (the server's engine loop hands deferred outputs to their streams in
    the middle of a step): concurrent streams get the same outputs as the engine without the
    overlap, and a stream left early frees its blocks."""
    reqs = mixed_requests("s")
    plain_engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=False)
    plain = content(run(plain_engine, reqs))
    held = plain_engine.block_manager.num_used  # the prefix adapter's KV, kept for reuse
    engine = engine_for(tiny_llama_dir, adapter_dirs, overlap=True)

    async def main(aeng: AsyncEngine):
        async def stream(req: Request) -> list[RequestOutput]:
            return [o async for o in aeng.generate(req)]

        early = Request("early", prompt="hello",
                        params=SamplingParams(max_new_tokens=40, ignore_eos=True))  # fmt: skip
        *outs, n = await asyncio.gather(*(stream(r) for r in reqs), leave_after(aeng, early, 3))
        return outs, n, await settled(aeng)

    outs, n, state = served(engine, main)
    got = content({r.request_id: o for r, o in zip(reqs, outs, strict=True)})
    assert n == 3 and state == (held, False)
    # arrivals interleave with steps differently here, so batches differ: in fp32 a logprob
    # may move in its last bits with the batch's shape; everything else is the same
    for rid, want in plain.items():
        assert [o[:2] + o[3:] for o in got[rid]] == [o[:2] + o[3:] for o in want], rid
        for have, ref in zip(got[rid], want, strict=True):
            assert have[2] == ref[2] or have[2] == pytest.approx(ref[2], rel=1e-5), rid
