"""The static decode step (engine/static_step.py) against the classic one, on the CPU.

Eagerly and unpadded it runs today's ops on today's shapes: in fp32 the same greedy tokens and
the same logprobs bit for bit, with every adapter kind in the batch. In the form a CUDA graph
captures (rows padded to a bucket with the dummy sequence, block tables at full width, adapter
deltas by per-token slot index), run here eagerly, the greedy tokens are still the same. Sampled
tokens follow the request's seed, whatever else shares its batch.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.cuda_graphs import default_sizes
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.eager_graphs import EagerBuckets, EagerCapture

KINDS = (None, "lora", "lora-qv", "bottleneck", "pfeiffer", "prefix", "prompt", "template")
WORDS = "the quick brown fox jumps over the lazy dog low rank adapters share a batch".split()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return A.every_kind(tiny_llama_dir, tmp_path_factory.mktemp("static-step"))


def engine_for(model_dir, dirs, decode_step: str, max_loras: int = 8, **kw) -> Engine:
    kw = {"dtype": "float32", "max_num_batched_tokens": 512, **kw}
    engine = Engine.from_config(EngineConfig(
        model=str(model_dir), device="cpu", num_kv_blocks=512, block_size=4,
        max_loras=max_loras, max_num_seqs=16, max_model_len=128, decode_step=decode_step,
        **kw))  # fmt: skip
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    return engine


def requests(n: int, params: SamplingParams, tag: str = "") -> list[Request]:
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + 3 * (i % 4)))
        out.append(Request(f"{tag}{i}", prompt=prompt, adapter=KINDS[i % len(KINDS)],
                           params=params))  # fmt: skip
    return out


def run(engine: Engine, reqs: list[Request]) -> dict[str, tuple[list[int], list[float]]]:
    got = engine.generate(reqs)
    return {
        rid: ([t for o in outs for t in o.token_ids], [p for o in outs for p in (o.logprobs or [])])
        for rid, outs in got.items()
    }


GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True)
PENALIZED = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True,
                           repetition_penalty=1.5)  # fmt: skip


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "penalty"])
def test_static_step_equals_the_classic_step_bit_for_bit(tiny_llama_dir, adapter_dirs, params):
    reqs = requests(12, params)  # every kind, some arriving as others decode
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic"), reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
    assert engine.runner.static is not None and engine.runner.static.graphs is None
    assert run(engine, reqs) == classic


def test_the_captured_form_gives_the_classic_greedy_tokens(tiny_llama_dir, adapter_dirs):
    # 16 rows > the largest bucket (12) run unpadded; as requests finish, 12, 9 (padded to
    # 12), 6 (to 8) and 3 (to 4) rows replay the buckets.
    reqs = [replace(r, params=replace(GREEDY, max_new_tokens=3 + i % 5))
            for i, r in enumerate(requests(16, GREEDY))]  # fmt: skip
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic"), reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
    buckets = EagerBuckets.install(engine, 12)  # 1, 2, 4, 8, 12: most steps padded
    got = run(engine, reqs)
    assert buckets.replays > 0
    for rid, (tokens, logprobs) in classic.items():
        assert got[rid][0] == tokens, rid
        assert got[rid][1] == pytest.approx(logprobs, abs=1e-4)


def test_contexts_past_the_captured_length_run_eagerly(tiny_llama_dir, adapter_dirs):
    # Graphs serve contexts up to 16 positions (4 blocks of 4): the batch replays them until
    # its longest sequence passes 16, then its steps run eagerly, as wide as they need.
    params = replace(GREEDY, max_new_tokens=14)
    reqs = [Request(f"r{i}", prompt=" ".join(WORDS[i : i + 2 + i % 3]), params=params,
                    adapter=("lora", None, "bottleneck")[i % 3]) for i in range(6)]  # fmt: skip
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic"), reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static", max_cuda_graph_len=16)
    step = engine.runner.static
    assert (step.options.graph_blocks, step.options.max_blocks) == (4, 32)
    buckets = EagerBuckets.install(engine, 12)
    got = run(engine, reqs)
    assert buckets.replays > 0 and buckets.longest <= 16
    replays = buckets.replays
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in classic.items()}
    long = [replace(reqs[0], request_id="long", params=replace(GREEDY, max_new_tokens=30))]
    assert run(engine, long)["long"][0] == run(engine_for(
        tiny_llama_dir, adapter_dirs, "classic"), long)["long"][0]  # fmt: skip
    assert buckets.replays - replays < 29  # its steps past 16 positions did not replay


def test_slot_reuse_after_eviction_keeps_the_buffers_and_the_tokens(tiny_llama_dir, adapter_dirs):
    # Two slots, three slot adapters: each wave evicts one and loads another into its slot.
    waves = [["lora", "bottleneck"], ["lora-qv", "bottleneck"], ["lora", "pfeiffer"]]
    classic = engine_for(tiny_llama_dir, adapter_dirs, "classic", max_loras=2)
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static", max_loras=2)
    EagerBuckets.install(engine, 12)
    buffers: dict = {}
    for w, names in enumerate(waves):
        reqs = [Request(f"w{w}-{i}", prompt=" ".join(WORDS[i : i + 4]), adapter=names[i % 2],
                        params=GREEDY) for i in range(5)]  # fmt: skip
        want, got = run(classic, reqs), run(engine, reqs)
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
        slots = engine.slots
        for key, mod in (*slots.lora.items(), *slots.bottleneck.items()):
            ptrs = (mod.A.data_ptr(), mod.B.data_ptr(), mod.rank.data_ptr(), mod.scale.data_ptr())
            assert buffers.setdefault(key, ptrs) == ptrs, key  # written in place, never moved
    assert engine.adapters.evictions > 0


SAMPLED = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_k=40,
                         top_p=0.95, seed=1234)  # fmt: skip


@pytest.mark.parametrize("form", ["eager", "captured"])
def test_a_seed_gives_the_same_tokens_alone_and_in_any_batch(tiny_llama_dir, adapter_dirs, form):
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
    if form == "captured":
        EagerBuckets.install(engine, 12)
    probe = Request("probe", prompt="the lazy dog jumps", adapter="lora", params=SAMPLED)
    alone = run(engine, [probe])["probe"][0]
    assert run(engine, [probe])["probe"][0] == alone  # repeatable
    others = requests(9, SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=1.2,
                                        seed=7), tag="o")  # fmt: skip
    mixed = run(engine, [others[0], others[1], probe, *others[2:]])
    assert mixed["probe"][0] == alone
    other_seed = Request("probe", prompt="the lazy dog jumps", adapter="lora",
                         params=replace(SAMPLED, seed=99))
    assert run(engine, [other_seed])["probe"][0] != alone


def test_a_sampler_that_fails_to_capture_runs_eagerly_after_the_replayed_forward(
    tiny_llama_dir, adapter_dirs, caplog, monkeypatch
):  # fmt: skip
    """DecodeGraphs' own capture and replay (tests/eager_graphs.EagerCapture), the sampler
    holding an op a graph cannot: the forwards stay captured, the sampler runs eagerly after
    each replay, and the tokens are the classic step's."""
    reqs = requests(8, GREEDY)
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic"), reqs)
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
    step = engine.runner.static
    sample_rows = step.sample_rows

    def sampler(rows, draws, penalty):
        if graphs.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        sample_rows(rows, draws, penalty)

    monkeypatch.setattr(step, "sample_rows", sampler)
    graphs = EagerCapture(step, default_sizes(12))
    step.token_slot_deltas = True
    graphs.capture()
    step.graphs = graphs
    assert set(graphs.base) == set(graphs.sizes) and not graphs.samplers
    assert "the sampler failed, it runs eagerly" in caplog.text
    got = run(engine, reqs)
    assert graphs.replays > 0 and step.graphs is graphs
    for rid, (tokens, _) in classic.items():
        assert got[rid][0] == tokens, rid


def test_an_adapter_forward_that_fails_to_capture_leaves_only_adapter_steps_eager(
    tiny_llama_dir, adapter_dirs, caplog, monkeypatch
):  # fmt: skip
    """The adapter deltas holding an op a graph cannot: that capture fails once, steps with
    adapters run eagerly from then on, steps without them still replay their graphs, and
    every token is the classic step's."""
    with_adapters = requests(8, GREEDY, tag="a")
    base_only = [replace(r, adapter=None) for r in requests(6, GREEDY, tag="b")]
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic"), with_adapters + base_only)
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
    graphs = EagerCapture.install(engine, 12)
    step = engine.runner.static
    forward = step.forward

    def failing(rows, width, hook):
        if graphs.capturing and hook is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        forward(rows, width, hook)

    monkeypatch.setattr(step, "forward", failing)
    got = run(engine, with_adapters)
    assert graphs.adapter_failed and not graphs.adapter
    assert caplog.text.count("steps with adapters run eagerly") == 1  # tried once, not per step
    replays = graphs.replays
    got |= run(engine, base_only)
    assert graphs.replays > replays and step.graphs is graphs
    for rid, (tokens, _) in classic.items():
        assert got[rid][0] == tokens, rid


def test_adapter_graphs_are_captured_again_when_the_slot_buffers_grow(
    tiny_llama_dir, adapter_dirs, caplog
):  # fmt: skip
    """DecodeGraphs' adapter forwards (tests/eager_graphs.EagerCapture: a replay runs the body
    as captured, with the hook over the slot buffers of then). A later adapter that targets
    modules no earlier one did grows the buffers: the adapter forwards must be captured again,
    once, or its deltas on the new modules would be missing. Tokens are the classic step's."""
    waves = [
        [replace(r, adapter=a) for r, a in zip(requests(6, GREEDY, tag="qv"),
                                               [None, "lora-qv"] * 3, strict=True)],
        [replace(r, adapter=a) for r, a in zip(requests(8, GREEDY, tag="all"),
                                               [None, "lora-qv", "lora", "bottleneck"] * 2,
                                               strict=True)],
    ]  # fmt: skip
    classic_engine = engine_for(tiny_llama_dir, adapter_dirs, "classic")
    classic = [run(classic_engine, w) for w in waves]
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
    caplog.set_level(logging.INFO, logger="peftserve.engine.cuda_graphs")
    graphs = EagerCapture.install(engine, 12)
    got = [run(engine, waves[0])]
    assert graphs.adapter and "grew" not in caplog.text
    captured = graphs.captures
    got.append(run(engine, waves[1]))
    assert "adapter slot buffers grew" in caplog.text
    assert graphs.captures > captured and not graphs.adapter_failed
    for want, have in zip(classic, got, strict=True):
        for rid, (tokens, _) in want.items():
            assert have[rid][0] == tokens, rid


def test_adapter_graphs_hold_only_the_modules_of_their_rows_adapters(
    tiny_llama_dir, adapter_dirs, monkeypatch
):  # fmt: skip
    """With all-linear LoRAs and bottlenecks resident, a decode step whose rows hold only q,v
    LoRAs replays an adapter forward over the qkv modules alone (the others would add zeros
    for its rows, a kernel node each); a step that mixes kinds replays one over the union of
    its adapters' modules; past MODULE_SETS sets a layout, one over every module. Tokens are
    the classic step's throughout (EagerCapture replays the body as captured, so a module left
    out that a row needs changes them)."""
    from peftserve.engine import cuda_graphs

    waves = [
        [replace(r, adapter=a) for r, a in zip(requests(8, GREEDY, tag="all"),
                                               [None, "lora-qv", "lora", "bottleneck"] * 2,
                                               strict=True)],
        [replace(r, adapter=a) for r, a in zip(requests(6, GREEDY, tag="qv"),
                                               [None, "lora-qv"] * 3, strict=True)],
        [replace(r, adapter=a) for r, a in zip(requests(6, GREEDY, tag="lora"),
                                               ["lora", "pfeiffer"] * 3, strict=True)],
    ]  # fmt: skip
    classic_engine = engine_for(tiny_llama_dir, adapter_dirs, "classic")
    classic = [run(classic_engine, w) for w in waves]
    for limit in (cuda_graphs.MODULE_SETS, 1):
        monkeypatch.setattr(cuda_graphs, "MODULE_SETS", limit)
        engine = engine_for(tiny_llama_dir, adapter_dirs, "static")
        graphs = EagerCapture.install(engine, 12)
        slots = engine.runner.static.slots
        got = [run(engine, waves[0])]
        everything = {("lora", *k) for k in slots.lora} | {("bottleneck", *k)
                                                           for k in slots.bottleneck}  # fmt: skip
        got.append(run(engine, waves[1]))
        sets = {modules for _, modules in graphs.adapter}
        qkv_only = [m for m in sets if m != cuda_graphs.ALL and {k[2] for k in m} == {"qkv"}]
        if limit > 1:
            assert qkv_only and all(k[0] == "lora" for m in qkv_only for k in m)
            assert everything - qkv_only[0]  # the other modules' kernels are left out
        else:  # the first set (wave 1's union) keeps its graph; the q,v rows take ALL
            assert cuda_graphs.ALL in sets and not qkv_only
        got.append(run(engine, waves[2]))
        assert not graphs.adapter_failed
        for want, have in zip(classic, got, strict=True):
            for rid, (tokens, _) in want.items():
                assert have[rid][0] == tokens, (limit, rid)


class RowsCounter:
    """Counts the steps with prefill chunks that the static step ran as rows."""

    def __init__(self, engine: Engine) -> None:
        step = engine.runner.static
        assert step is not None
        self.steps = 0
        launch = step.launch_rows

        def counted(items):
            wait = launch(items)
            self.steps += wait is not None
            return wait

        step.launch_rows = counted


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "penalty"])
def test_prefill_chunks_as_decode_rows_give_the_classic_tokens(
    tiny_llama_dir, adapter_dirs, params
):
    # Every kind (prefix and prompt tuning's virtual tokens already in the blocks), prompts of
    # 2-11 tokens, 16 tokens a step (at most the 16 rows the step has): prompts admitted as
    # others decode (mixed steps); eagerly and unpadded
    reqs = requests(12, params)
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic",
                             max_num_batched_tokens=16), reqs)  # fmt: skip
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static", prefill_rows="always",
                        max_num_batched_tokens=16)  # fmt: skip
    rows = RowsCounter(engine)
    got = run(engine, reqs)
    assert rows.steps > 0
    for rid, (tokens, logprobs) in classic.items():
        assert got[rid][0] == tokens, rid
        assert got[rid][1] == pytest.approx(logprobs, abs=1e-4), rid


def test_prefill_rows_replay_the_buckets_and_chunks_continue(tiny_llama_dir, adapter_dirs):
    # Chunked prompts (8 tokens a step): a chunk that does not end its prompt samples nothing,
    # the next one continues its context; a step of more rows than the largest bucket (12)
    # runs the classic prefill.
    reqs = [replace(r, params=replace(GREEDY, max_new_tokens=3 + i % 3))
            for i, r in enumerate(requests(8, GREEDY))]  # fmt: skip
    classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic",
                             max_num_batched_tokens=8), reqs)  # fmt: skip
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static", prefill_rows="always",
                        max_num_batched_tokens=8)  # fmt: skip
    buckets = EagerBuckets.install(engine, 12)
    rows = RowsCounter(engine)
    got = run(engine, reqs)
    assert rows.steps > 0 and buckets.replays > 0
    for rid, (tokens, logprobs) in classic.items():
        assert got[rid][0] == tokens, rid
        assert got[rid][1] == pytest.approx(logprobs, abs=1e-4), rid
    long = [Request("long", prompt=" ".join(WORDS * 2), params=GREEDY, adapter="lora")]
    engine = engine_for(tiny_llama_dir, adapter_dirs, "static", prefill_rows="always")
    EagerBuckets.install(engine, 12)
    rows = RowsCounter(engine)
    assert run(engine, long)["long"][0] == run(engine_for(
        tiny_llama_dir, adapter_dirs, "classic"), long)["long"][0]  # fmt: skip
    assert rows.steps == 0  # its one prefill step: 30 rows


def test_prefill_rows_by_default_only_replayed_and_in_half_precision(tiny_llama_dir,
                                                                     adapter_dirs):
    reqs = requests(4, GREEDY)
    for dtype, graphs, used in (("float32", True, False), ("bfloat16", False, False),
                                ("bfloat16", True, True)):  # fmt: skip
        engine = engine_for(tiny_llama_dir, adapter_dirs, "static", dtype=dtype,
                            max_num_batched_tokens=12)  # fmt: skip
        if graphs:
            EagerBuckets.install(engine, 12)
        rows = RowsCounter(engine)
        got = run(engine, reqs)
        assert (rows.steps > 0) is used, (dtype, graphs)
        classic = run(engine_for(tiny_llama_dir, adapter_dirs, "classic", dtype=dtype,
                                 max_num_batched_tokens=12), reqs)  # fmt: skip
        for rid, (tokens, logprobs) in classic.items():
            # the first token: the same prompt's, only the rounding of its prefill may differ
            assert got[rid][1][0] == pytest.approx(logprobs[0], abs=0.05), (dtype, rid)
            assert len(got[rid][0]) == len(tokens) == GREEDY.max_new_tokens
    off = engine_for(tiny_llama_dir, adapter_dirs, "static", dtype="bfloat16",
                     prefill_rows="off", max_num_batched_tokens=12)  # fmt: skip
    EagerBuckets.install(off, 12)
    rows = RowsCounter(off)
    run(off, reqs)
    assert rows.steps == 0
