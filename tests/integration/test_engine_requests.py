"""Engine request handling: validation errors that leave others untouched, stop conditions,
streaming through AsyncEngine, abort freeing blocks."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import FinishReason
from peftserve.errors import InvalidRequest, Overloaded
from tests.device import DEVICE
from tests.outcomes import leave_after, served, settled


@pytest.fixture()
def engine(tiny_llama_dir) -> Engine:
    return Engine.from_config(
        EngineConfig(
            model=str(tiny_llama_dir),
            dtype="float32",
            device=DEVICE,
            num_kv_blocks=64,
            block_size=4,
            max_model_len=64,
            max_new_tokens_limit=200,
            max_waiting=4,
        )
    )


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


@pytest.mark.parametrize(
    "req, message",
    [
        (Request("a", prompt=""), "empty"),
        (Request("a", prompt="x " * 80), "context"),
        (Request("a", prompt="hi", params=SamplingParams(max_new_tokens=201)), "limit"),
        (Request("a"), "exactly one"),
        (Request("a", prompt="hi", prompt_token_ids=(1, 2)), "exactly one"),
        (Request("a", prompt_token_ids=(1, 10**6)), "prompt_token_ids"),
        (Request("a", messages=()), "messages"),
    ],
)
def test_bad_requests_are_refused_and_others_keep_running(engine, req, message):
    good = Request(
        "good", prompt="hello world", params=SamplingParams(max_new_tokens=8, ignore_eos=True)
    )
    engine.add_request(good)
    engine.step()
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(req)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].request_id == "good" and outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].completion_tokens == 8
    assert engine.block_manager.num_used == 0


def test_duplicate_request_id_and_full_queue_are_refused(engine):
    for i in range(4):
        engine.add_request(Request(f"r{i}", prompt="hello"))
    with pytest.raises(Overloaded):
        engine.add_request(Request("r9", prompt="hello"))
    engine.step()  # r0 is running now: its id stays taken
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request(Request("r0", prompt="hello"))


def test_stop_string_cuts_the_text_and_stop_token_is_not_emitted(engine):
    base = engine.generate(
        [
            Request(
                "b", prompt="hello world", params=SamplingParams(max_new_tokens=20, ignore_eos=True)
            )
        ]
    )["b"]
    full = text_of(base)
    assert len(full) > 6
    stop = full[3:6]
    outs = engine.generate(
        [
            Request(
                "s",
                prompt="hello world",
                params=SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,)),
            )
        ]
    )["s"]
    assert text_of(outs) == full[: full.index(stop)]
    assert outs[-1].finish_reason is FinishReason.STOP
    tok = base[0].token_ids[0]
    outs = engine.generate(
        [
            Request(
                "t",
                prompt="hello world",
                params=SamplingParams(max_new_tokens=20, stop_token_ids=(tok,)),
            )
        ]
    )["t"]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].completion_tokens == 1
    assert text_of(outs) == ""


def test_chat_messages_use_the_chat_template(engine):
    msgs = ({"role": "user", "content": "hello"},)
    seq = engine.add_request(Request("c", messages=msgs))
    expected = engine.tokenizer.apply_chat_template(
        list(msgs), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert seq.prompt_token_ids == list(expected)


def test_a_token_past_the_models_vocabulary_is_refused(tiny_llama_dir, tmp_path):
    """A tokenizer with more entries than the model's embedding rows (an added token saved
    beside a model that never grew): the request that uses one is refused with what is wrong
    (on a GPU the step would end in a device-side assert); the others are served."""
    from transformers import AutoTokenizer

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    tokenizer.add_tokens(["zebrafinch"])
    tokenizer.save_pretrained(model_dir)
    engine = Engine.from_config(EngineConfig(model=str(model_dir), dtype="float32", device=DEVICE,
                                             num_kv_blocks=64, block_size=4, max_model_len=64))
    greedy = SamplingParams(max_new_tokens=4, ignore_eos=True)
    refused = rf"token id {vocab} from the tokenizer .* \[0, {vocab}\)"
    with pytest.raises(InvalidRequest, match=refused):
        engine.add_request(Request("bad", prompt="hello zebrafinch", params=greedy))
    outs = engine.generate([Request("good", prompt="hello world", params=greedy)])
    assert len([t for o in outs["good"] for t in o.token_ids]) == 4


def test_logprobs_match_scored_logits(engine):
    outs = engine.generate(
        [
            Request(
                "l",
                prompt="hello world",
                params=SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True),
            )
        ]
    )["l"]
    toks = [t for o in outs for t in o.token_ids]
    lps = [lp for o in outs for lp in o.logprobs]
    prompt = engine.tokenizer("hello world")["input_ids"]
    ref = torch.log_softmax(engine.score(prompt + toks), -1)
    n = len(prompt)
    expected = [float(ref[n - 1 + i, t]) for i, t in enumerate(toks)]
    assert lps == pytest.approx(expected, abs=1e-4)


def test_async_engine_streams_and_abort_frees_blocks(engine):
    async def main(aeng: AsyncEngine):
        long = Request(
            "long", prompt="hello", params=SamplingParams(max_new_tokens=90, ignore_eos=True)
        )
        short = Request(
            "short", prompt="the quick", params=SamplingParams(max_new_tokens=6, ignore_eos=True)
        )
        got = []

        async def consume_short():
            async for o in aeng.generate(short):
                got.append(o)

        n, _ = await asyncio.gather(leave_after(aeng, long, 3), consume_short())
        with pytest.raises(InvalidRequest):
            async for _ in aeng.generate(Request("bad", prompt="")):
                pass
        return n, got, await settled(aeng)

    n, got, used = served(engine, main)
    assert n == 3
    assert got[-1].finished and got[-1].completion_tokens == 6
    assert sum(len(o.token_ids) for o in got) == 6
    assert used == (0, False)


def test_async_engine_builds_the_engine_on_its_own_thread(tiny_llama_dir):
    import threading

    built_on = []

    def build() -> Engine:
        built_on.append(threading.current_thread().name)
        return Engine.from_config(
            EngineConfig(
                model=str(tiny_llama_dir), dtype="float32", device=DEVICE, num_kv_blocks=16
            )
        )

    aeng = AsyncEngine()
    aeng.start(build)
    try:
        assert built_on == ["peftserve-engine"] and aeng.engine is not None

        async def main():
            return [
                o
                async for o in aeng.generate(
                    Request(
                        "x",
                        prompt="hello",
                        params=SamplingParams(max_new_tokens=3, ignore_eos=True),
                    )
                )
            ]

        assert asyncio.run(main())[-1].completion_tokens == 3
    finally:
        aeng.shutdown()

    def broken() -> Engine:
        raise InvalidRequest("no such model")

    with pytest.raises(InvalidRequest, match="no such model"):
        AsyncEngine().start(broken)


def test_an_adapter_loaded_before_the_first_step_leaves_the_step_threads_count(
        tiny_llama_dir, tmp_path):
    """The adapter loaders run with torch.set_num_threads(1), which changes the count torch
    gives a thread at its first parallel op; the step thread's count (and the C++ ops' own
    copy of it) is fixed as the thread starts, so a load before the first step leaves the
    steps on --num-threads. It once left the server stepping on one core of two."""
    from peftserve.kernels import cpu_ext
    from tests.adapters import make_lora

    assert cpu_ext.load(), cpu_ext.unavailable_reason()
    lora = make_lora(tiny_llama_dir, tmp_path / "lora")
    aeng = AsyncEngine()
    aeng.start(lambda: Engine.from_config(EngineConfig(
        model=str(tiny_llama_dir), dtype="bfloat16", device="cpu", num_threads=2,
        num_kv_blocks=16)))  # fmt: skip
    try:
        async def main() -> tuple[int, int]:
            await aeng.register_adapter("a", lora)
            request = Request("x", prompt="hello", adapter="a",
                              params=SamplingParams(max_new_tokens=2, ignore_eos=True))
            assert [o async for o in aeng.generate(request)][-1].completion_tokens == 2
            return (await aeng.call(torch.get_num_threads),
                    await aeng.call(torch.ops.peftserve_cpu.init_threads))

        assert asyncio.run(main()) == (2, 2)
    finally:
        aeng.shutdown()


def test_timings_count_from_the_arrival_the_server_stamped(engine):
    """The gRPC handler stamps arrival before tokenizing and handing the request over; queue
    time, TTFT and e2e count from there, not from when the engine thread took it."""
    waited = 0.75
    stamped = Request(
        "stamped",
        prompt_token_ids=(5, 6, 7),
        arrival_time=time.monotonic() - waited,
        params=SamplingParams(max_new_tokens=2, ignore_eos=True),
    )
    fresh = Request(
        "fresh",
        prompt_token_ids=(5, 6, 7),
        params=SamplingParams(max_new_tokens=2, ignore_eos=True),
    )
    outs = engine.generate([stamped, fresh])
    first = {rid: next(o for o in out if o.timings is not None) for rid, out in outs.items()}
    assert first["stamped"].timings.queue_s >= waited
    assert first["stamped"].timings.ttft_s >= waited
    assert outs["stamped"][-1].timings.e2e_s >= waited
    assert first["fresh"].timings.ttft_s < waited
