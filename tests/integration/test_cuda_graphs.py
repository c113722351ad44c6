"""CUDA graphs of the static decode step (engine/cuda_graphs.py): replayed, they give the tokens
the same step gives eagerly, for any mix of adapters, also after an adapter is evicted and
another loaded into its slot (whose buffers never move); greedy tokens equal the classic step's.
Run by bench/gpu.sh; on the CPU the same step runs eagerly in test_static_step.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="CUDA graphs need a CUDA device (the CPU runs the same step "
                              "eagerly: tests/integration/test_static_step.py)"),
]  # fmt: skip

WORDS = "the quick brown fox jumps over the lazy dog low rank adapters share a batch".split()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return A.every_kind(tiny_llama_dir, tmp_path_factory.mktemp("graphs"),
                        ("lora", "lora-qv", "bottleneck", "prefix", "prompt"))


def engine_for(model_dir, dirs, **kw) -> Engine:
    engine = Engine.from_config(EngineConfig(
        model=str(model_dir), device="cuda", dtype="float32", num_kv_blocks=512, block_size=4,
        max_loras=2, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=128,
        max_cuda_graph_batch=8, **kw))  # fmt: skip
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    return engine


def waves() -> list[list[Request]]:
    """Batches whose adapter mix changes; with 2 slots, each wave evicts and reloads."""
    mixes = [[None, "lora", "prefix"], ["lora-qv", "bottleneck", "prompt"], ["lora", None],
             ["bottleneck", "lora-qv", "lora"]]  # fmt: skip
    out = []
    for w, mix in enumerate(mixes):
        reqs = []
        for i in range(7):
            seeded = i % 3 == 2
            params = SamplingParams(max_new_tokens=4 + i % 4, ignore_eos=True, logprobs=True,
                                    temperature=0.8 if seeded else 0.0, top_k=20 if seeded else 0,
                                    seed=100 + i if seeded else None)  # fmt: skip
            prompt = " ".join(WORDS[(w + i + j) % len(WORDS)] for j in range(3 + i))
            reqs.append(Request(f"w{w}-{i}", prompt=prompt, adapter=mix[i % len(mix)],
                                params=params))  # fmt: skip
        out.append(reqs)
    return out


def run(engine: Engine, reqs: list[Request]) -> dict[str, tuple[list[int], list[float]]]:
    got = engine.generate(reqs)
    return {
        rid: ([t for o in outs for t in o.token_ids], [p for o in outs for p in (o.logprobs or [])])
        for rid, outs in got.items()
    }


def test_graph_replay_gives_the_eager_tokens(tiny_llama_dir, adapter_dirs):
    graphs = engine_for(tiny_llama_dir, adapter_dirs)
    eager = engine_for(tiny_llama_dir, adapter_dirs, cuda_graphs=False)
    classic = engine_for(tiny_llama_dir, adapter_dirs, decode_step="classic")
    step = graphs.runner.static
    assert step is not None and step.graphs is not None and step.graphs.captures > 0
    assert eager.runner.static is not None and eager.runner.static.graphs is None
    pointers: dict = {}
    for reqs in waves():
        want, got = run(eager, reqs), run(graphs, reqs)
        assert got.keys() == want.keys()
        for rid in want:
            assert got[rid][0] == want[rid][0], rid
            assert got[rid][1] == pytest.approx(want[rid][1], abs=1e-4)
        base = run(classic, reqs)
        for r in reqs:
            if r.params.greedy:
                assert got[r.request_id][0] == base[r.request_id][0], r.request_id
        slots = graphs.slots
        for key, mod in (*slots.lora.items(), *slots.bottleneck.items()):
            ptrs = (mod.A.data_ptr(), mod.B.data_ptr(), mod.rank.data_ptr(), mod.scale.data_ptr())
            assert pointers.setdefault(key, ptrs) == ptrs, key
    assert step.graphs.replays > 0
    assert graphs.adapters.evictions > 0


def test_short_prefills_replayed_as_rows_give_the_classic_prefills_tokens(
    tiny_llama_dir, adapter_dirs
):  # fmt: skip
    """Prefill chunks of at most 8 tokens a step (the largest bucket) replay the decode graphs
    as rows (fp32 here: "always"; by default only bf16/fp16 do), with every adapter mix of
    waves(), sampled rows included: the tokens of the same engine prefilling classically."""
    rows = engine_for(tiny_llama_dir, adapter_dirs, prefill_rows="always",
                      max_num_batched_tokens=8)  # fmt: skip
    plain = engine_for(tiny_llama_dir, adapter_dirs, prefill_rows="off",
                       max_num_batched_tokens=8)  # fmt: skip
    step = rows.runner.static
    assert step is not None and step.graphs is not None
    launch, used = step.launch_rows, []
    step.launch_rows = lambda items: used.append(launch(items)) or used[-1]
    for reqs in waves():
        want, got = run(plain, reqs), run(rows, reqs)
        for rid in want:
            assert got[rid][0] == want[rid][0], rid
            assert got[rid][1] == pytest.approx(want[rid][1], abs=1e-4)
    assert any(w is not None for w in used)


@pytest.mark.parametrize("overlap", ["shrink", "delta"])
def test_lora_work_beside_the_base_matmuls_gives_the_same_tokens(tiny_llama_dir, adapter_dirs,
                                                                 overlap):  # fmt: skip
    """config.lora_overlap: each LoRA's shrink (or its whole delta) on a second stream beside
    its base matmul, the fork and the join inside the captured graphs (and in the eager steps
    past the largest bucket): the tokens of the same engine without it, for every adapter mix
    of waves()."""
    split = engine_for(tiny_llama_dir, adapter_dirs, lora_overlap=overlap)
    plain = engine_for(tiny_llama_dir, adapter_dirs)
    step = split.runner.static
    assert step is not None and step.graphs is not None and step.side_stream is not None
    assert plain.runner.static is not None and plain.runner.static.side_stream is None
    for reqs in waves():
        want, got = run(plain, reqs), run(split, reqs)
        for rid in want:
            assert got[rid][0] == want[rid][0], rid
            assert got[rid][1] == pytest.approx(want[rid][1], abs=1e-4)
    assert step.graphs.replays > 0


def test_steps_scheduled_ahead_give_the_tokens_of_steps_scheduled_after(
    tiny_llama_dir, adapter_dirs
):  # fmt: skip
    """On the GPU a step scheduled ahead (EngineConfig.schedule_ahead) runs while the host
    takes the tokens of the step before it: the same tokens as with each step scheduled after
    them, with sequences that end by length (left out of it) and on a stop token (their rows
    dropped), and with repetition penalties. On the CPU: test_schedule_ahead.py."""
    from tests.integration.test_schedule_ahead import counting

    ahead = engine_for(tiny_llama_dir, adapter_dirs)
    after = engine_for(tiny_llama_dir, adapter_dirs, schedule_ahead=False)
    counts = counting(ahead)
    for reqs in waves():
        free = run(after, reqs)
        stopping = [replace(r, request_id=f"{r.request_id}-s", params=replace(
            r.params, stop_token_ids=(free[r.request_id][0][2],))) for r in reqs]  # fmt: skip
        # a penalty's history holds the newest token, added on the device in a step ahead
        penalized = [replace(r, request_id=f"{r.request_id}-p", params=replace(
            r.params, repetition_penalty=1.3 if i % 2 else 1.0))
            for i, r in enumerate(reqs)]  # fmt: skip
        for wave in (reqs, stopping, penalized):
            want, got = run(after, wave), run(ahead, wave)
            for rid in want:
                assert got[rid][0] == want[rid][0], rid
                assert got[rid][1] == pytest.approx(want[rid][1], abs=1e-4)
    assert counts["launched"] > 0 and counts["dropped"] > 0, counts


def wide_case(work, device: str) -> tuple[Engine, Engine, list[Request]]:
    """A model wider than the tiny one, with what its graphs do not hold: contexts past 256
    positions (decode attention over two splits and their merge), a vocabulary past the
    sampler's small-sort path, a rank-16 all-linear LoRA at hidden 512; graphs serving
    contexts up to 512, and a sequence that passes 512 as it decodes. -> (engine with graphs,
    engine without, the requests)."""
    from tests.tiny import make_model_dir

    model_dir = make_model_dir(work / "model", hidden_size=512, intermediate_size=1024,
                               num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
                               max_position_embeddings=1024)  # fmt: skip
    lora = A.make_lora(model_dir, work / "lora", r=16, seed=3, targets=A.ALL_LINEAR)

    def engine(**kw) -> Engine:
        e = Engine.from_config(EngineConfig(
            model=str(model_dir), device=device, dtype="float32", num_kv_blocks=256,
            block_size=16, max_loras=2, max_num_seqs=8, max_num_batched_tokens=1024,
            max_model_len=1024, max_cuda_graph_batch=8, max_cuda_graph_len=512,
            decode_step="static", **kw))  # fmt: skip
        e.adapters.register("lora", lora)
        return e

    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=True)
    drawn = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=True, temperature=0.9,
                           top_k=0, top_p=0.9, seed=11)  # fmt: skip
    reqs = []
    for i, (n, adapter) in enumerate([(500, None), (300, "lora"), (280, None), (5, "lora"),
                                      (9, None)]):  # fmt: skip
        ids = tuple((7 * j + i) % 300 + 5 for j in range(n))
        reqs.append(Request(f"w{i}", prompt_token_ids=ids, adapter=adapter,
                            params=drawn if i % 2 else greedy))  # fmt: skip
    return engine(), engine(cuda_graphs=False), reqs


def test_wide_model_long_contexts_and_the_captured_length(tmp_path):
    graphs, eager, reqs = wide_case(tmp_path, "cuda")
    step = graphs.runner.static
    assert step is not None and step.graphs is not None
    assert step.options.graph_blocks == 512 // 16
    got, want = run(graphs, reqs), run(eager, reqs)
    assert step.graphs.replays > 0
    for rid in want:
        assert got[rid][0] == want[rid][0], rid
        assert got[rid][1] == pytest.approx(want[rid][1], abs=1e-4)
