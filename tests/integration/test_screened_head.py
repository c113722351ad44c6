"""The screened LM head in the engine (bf16 on the C++ CPU kernels): greedy requests get the
tokens the whole head gives (EngineConfig(screened_head=False)), for the base model and every
adapter kind, alone and in one batch, and steps with a row that samples, wants logprobs or has
a repetition penalty take the whole head for every row."""

from __future__ import annotations

import pytest

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.kernels.screened_head import MAX_ROWS
from tests import adapters as A

KINDS = (None, "lora", "bottleneck", "prefix", "prompt", "template")
WORDS = "low rank adapters share one batch of the quick brown fox and the lazy dog".split()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return A.every_kind(tiny_llama_dir, tmp_path_factory.mktemp("screened"), KINDS[1:])


def engine_for(model_dir, dirs, screened: bool) -> Engine:
    engine = Engine.from_config(EngineConfig(
        model=str(model_dir), device="cpu", dtype="bfloat16", backend="cpp", num_kv_blocks=512,
        block_size=4, max_loras=4, screened_head=screened))  # fmt: skip
    for name, path in dirs.items():
        engine.adapters.register(name, path)
    return engine


def requests(params: list[SamplingParams]) -> list[Request]:
    out = []
    for i, p in enumerate(params):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + 2 * i))
        out.append(Request(f"r{i}", prompt=prompt, adapter=KINDS[i % len(KINDS)], params=p))
    return out


def tokens(engine: Engine, reqs: list[Request]) -> dict[str, list[int]]:
    results = engine.generate(reqs)
    return {rid: [t for out in outs for t in out.token_ids] for rid, outs in results.items()}


def counting(engine: Engine) -> list[tuple[int, bool]]:
    """Wraps the model's greedy_tokens: per call, its rows and whether it gave the tokens."""
    calls: list[tuple[int, bool]] = []
    inner = engine.model.greedy_tokens

    def greedy_tokens(h):
        out = inner(h)
        calls.append((h.shape[0], out is not None))
        return out

    engine.model.greedy_tokens = greedy_tokens
    return calls


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, adapter_dirs):
    return engine_for(tiny_llama_dir, adapter_dirs, True), engine_for(
        tiny_llama_dir, adapter_dirs, False
    )


def test_greedy_tokens_equal_the_whole_heads(engines):
    screened, whole = engines
    assert screened.model.screened_head is not None and whole.model.screened_head is None
    calls = counting(screened)
    for size in (MAX_ROWS, 12):  # the screen serves up to MAX_ROWS rows, the full head beyond
        greedy = [SamplingParams(max_new_tokens=12, ignore_eos=True) for _ in range(size)]
        together = tokens(screened, requests(greedy))
        assert together == tokens(whole, requests(greedy))
        for r in requests(greedy)[: len(KINDS)]:  # and each alone
            alone = {r.request_id: together[r.request_id]}
            assert tokens(screened, [r]) == tokens(whole, [r]) == alone
    assert {rows for rows, _ in calls} >= {1, MAX_ROWS, 12}
    assert all(screened_it == (rows <= MAX_ROWS) for rows, screened_it in calls)


@pytest.mark.parametrize(
    "other",
    [
        SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=3),
        SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True),
        SamplingParams(max_new_tokens=6, ignore_eos=True, repetition_penalty=1.3),
    ],
)
def test_a_row_that_needs_the_logits_takes_the_whole_head(engines, other):
    screened, whole = engines
    calls = counting(screened)
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True), other]
    got = screened.generate(requests(params))
    want = whole.generate(requests(params))
    for rid in got:
        assert [(o.token_ids, o.logprobs) for o in got[rid]] == [
            (o.token_ids, o.logprobs) for o in want[rid]
        ]
    assert not calls  # no step had only plain greedy rows
