"""The OpenAI-compatible HTTP API through a real server and the real `openai` client: completions
and chat, streamed and not, on the base model and on adapters of two kinds; each greedy answer
equals peftserve.v1's for the same request. Errors come in OpenAI's error shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from peftserve.client import Client, Sampling
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN
from tests.e2e.server_process import metric, scrape, wait_for

MESSAGES = [{"role": "user", "content": "hello world, how are you today?"}]
PROMPT = "the quick brown fox"
N = 10
GREEDY = Sampling(max_new_tokens=N, ignore_eos=True)
NO_EOS = {"ignore_eos": True}  # vLLM's extra field: fixed-length answers to compare


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("adapter-root")
    A.make_lora(tiny_llama_dir, root / "lora", r=4, seed=1)
    A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=5, seed=4)
    A.make_bottleneck(tiny_llama_dir, root / "houlsby", "houlsby", seed=3)
    return root


@pytest.fixture(scope="module")
def server(start_server, token_file, root):
    server = start_server("--http-port", "0", "--adapter-root", str(root),
                          "--admin-token-file", str(token_file))
    assert server.http_url.startswith("http://127.0.0.1:")
    return server


@pytest.fixture(scope="module")
def v1(server):
    with Client(server.target, timeout=60, admin_token=ADMIN_TOKEN) as c:
        c.register_adapter("lora", "lora")
        c.register_adapter("prefix", "prefix")
        yield c


@pytest.fixture(scope="module")
def oai(server, v1):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def base(v1) -> str:
    return v1.server_info().model


def post(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_base_and_every_adapter_with_its_kind(oai, base, tiny_llama_dir):
    assert base == Path(tiny_llama_dir).name  # ServerInfo and /v1/models: the directory's name
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {base, "lora", "prefix"}
    assert {m.id: m.model_extra["kind"] for m in models.values()} == {
        base: "base", "lora": "lora", "prefix": "prefix_tuning"}
    assert models["lora"].model_extra["parent"] == base
    assert oai.models.retrieve("prefix").model_extra["kind"] == "prefix_tuning"


@pytest.mark.parametrize("model", ["base", "lora", "prefix"])
def test_completion_equals_peftserve_v1(oai, v1, base, model):
    adapter = None if model == "base" else model
    want = v1.generate(PROMPT, adapter=adapter, sampling=GREEDY)
    got = oai.completions.create(model=base if adapter is None else adapter, prompt=PROMPT,
                                 max_tokens=N, temperature=0, extra_body=NO_EOS)
    assert got.choices[0].text == want.text and want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, N)
    assert got.object == "text_completion" and got.model == (adapter or base)
    chunks = list(oai.completions.create(model=adapter or base, prompt=PROMPT, max_tokens=N,
                                         temperature=0, stream=True, extra_body=NO_EOS))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("model", ["base", "lora", "prefix"])
def test_chat_equals_peftserve_v1(oai, v1, base, model):
    adapter = None if model == "base" else model
    want = v1.generate(messages=MESSAGES, adapter=adapter, sampling=GREEDY)
    got = oai.chat.completions.create(model=adapter or base, messages=MESSAGES,
                                      max_completion_tokens=N, temperature=0,
                                      extra_body=NO_EOS)
    assert got.choices[0].message.content == want.text and want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == N
    stream = oai.chat.completions.create(model=adapter or base, messages=MESSAGES,
                                         max_tokens=N, temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_body=NO_EOS)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert chunks[-2].choices[0].finish_reason == "length"


def test_adapters_differ_from_the_base(oai, base):
    answers = {m: oai.completions.create(model=m, prompt=PROMPT, max_tokens=N, temperature=0,
                                         extra_body=NO_EOS).choices[0].text
               for m in (base, "lora", "prefix")}
    assert len(set(answers.values())) == 3, answers


def test_logprobs_are_peftserve_v1s(oai, v1, base):
    want = v1.generate(PROMPT, sampling=Sampling(max_new_tokens=N, ignore_eos=True,
                                                  logprobs=True))
    got = oai.completions.create(model=base, prompt=PROMPT, max_tokens=N, temperature=0,
                                 logprobs=0, extra_body=NO_EOS).choices[0].logprobs
    assert got.token_logprobs == pytest.approx(want.logprobs)
    assert "".join(got.tokens) == want.text
    chat = oai.chat.completions.create(model=base, messages=MESSAGES, max_tokens=N,
                                       temperature=0, logprobs=True, extra_body=NO_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == N and all(c.logprob <= 0 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_stop_and_seeded_sampling(oai, v1, base):
    whole = oai.completions.create(model=base, prompt=PROMPT, max_tokens=N, temperature=0,
                                   extra_body=NO_EOS).choices[0].text
    stop = whole[3:6]
    cut = oai.completions.create(model=base, prompt=PROMPT, max_tokens=N, temperature=0,
                                 stop=[stop], extra_body=NO_EOS).choices[0]
    assert cut.finish_reason == "stop" and cut.text == whole[:whole.index(stop)]
    seeded = [oai.completions.create(model="lora", prompt=PROMPT, max_tokens=N, temperature=1.0,
                                     top_p=0.9, seed=7, extra_body=NO_EOS).choices[0].text
              for _ in range(2)]
    want = v1.generate(PROMPT, adapter="lora", sampling=Sampling(
        max_new_tokens=N, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7)).text
    assert seeded == [want, want]


def test_unknown_model_is_404_in_openais_shape(oai, server, base):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-adapter", messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 404
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-adapter" in error["message"]
    with pytest.raises(openai.NotFoundError):
        list(oai.completions.create(model="no-such-adapter", prompt="x", stream=True))
    status, body = post(server.http_url + "/v1/completions",
                        {"model": "no-such-adapter", "prompt": "x"})
    assert status == 404
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra", [{"n": 2}, {"presence_penalty": 0.5}, {"max_tokens": 0},
                                   {"temperature": -1}, {"prompt": ["a", "b"]}])
def test_bad_requests_are_400(server, base, extra):
    status, body = post(server.http_url + "/v1/completions",
                        {"model": base, "prompt": "x", **extra})
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_http_requests_reach_the_metrics(oai, server):
    def finished() -> dict[str, float]:
        samples = scrape(server.metrics_url)
        return {o: metric(samples, "peftserve_requests_total", adapter="lora", outcome=o)
                for o in ("length", "cancelled")}

    before = finished()
    oai.completions.create(model="lora", prompt=PROMPT, max_tokens=3, extra_body=NO_EOS)
    list(oai.chat.completions.create(model="lora", messages=MESSAGES, max_tokens=3, stream=True,
                                     extra_body=NO_EOS))
    assert finished() == {"length": before["length"] + 2, "cancelled": before["cancelled"]}


def test_closing_a_stream_aborts_its_request(oai, v1, server, base):
    """The client hangs up mid-stream: the request stops and its KV blocks are freed at once."""
    before = metric(scrape(server.metrics_url), "peftserve_requests_total", outcome="cancelled")
    blocks = v1.server_info().load.kv_blocks_used  # a prefix adapter's shared blocks stay
    stream = oai.completions.create(model=base, prompt="cancel me", max_tokens=480, stream=True,
                                    extra_body=NO_EOS)  # seconds of work on the tiny model
    for i, _ in enumerate(stream):
        if i == 20:
            break
    assert v1.server_info().load.num_running == 1
    stream.close()

    def idle() -> bool:
        load = v1.server_info().load
        return (load.num_running, load.kv_blocks_used, load.active_streams) == (0, blocks, 0)

    wait_for(idle, what="the closed stream's request aborted")
    after = metric(scrape(server.metrics_url), "peftserve_requests_total", outcome="cancelled")
    assert after == before + 1


def test_adapter_load_and_unload_need_the_admin_token(oai, server, base):
    url = server.http_url + "/v1/load_lora_adapter"
    body = {"lora_name": "houlsby", "lora_path": "houlsby"}
    status, error = post(url, body)
    assert (status, error["error"]["type"]) == (401, "authentication_error")
    assert post(url, body, token="wrong")[0] == 403
    status, card = post(url, body, token=ADMIN_TOKEN)
    assert status == 200 and (card["id"], card["kind"]) == ("houlsby", "bottleneck")
    out = oai.completions.create(model="houlsby", prompt=PROMPT, max_tokens=3)
    assert out.usage.completion_tokens >= 1
    status, _ = post(server.http_url + "/v1/unload_lora_adapter", {"lora_name": "houlsby"},
                     token=ADMIN_TOKEN)
    assert status == 200
    assert "houlsby" not in {m.id for m in oai.models.list()}
    assert post(url, {"lora_name": "x", "lora_path": "../outside"}, ADMIN_TOKEN)[0] == 400
