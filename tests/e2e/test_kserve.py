"""The KServe v2 gRPC API (inference.GRPCInferenceService) on the peftserve port, through the
real tritonclient.grpc run from its own virtual environment, as a Triton/KServe user would run
it: readiness, metadata, ModelInfer on the base and on adapters; greedy answers equal
peftserve.v1's for the same request, an unknown model is NOT_FOUND."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from peftserve.client import Client, Sampling
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN
from tests.e2e.tritonclient_venv import tritonclient_python

PROMPT = "the quick brown fox"
N = 10
CLIENT_SCRIPT = Path(__file__).with_name("kserve_client.py")


@pytest.fixture(scope="module")
def server(start_server, token_file, tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("adapter-root")
    A.make_lora(tiny_llama_dir, root / "lora", r=4, seed=1)
    A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=5, seed=4)
    return start_server("--adapter-root", str(root), "--admin-token-file", str(token_file))


@pytest.fixture(scope="module")
def v1(server):
    with Client(server.target, timeout=60, admin_token=ADMIN_TOKEN) as c:
        c.register_adapter("lora", "lora")
        c.register_adapter("prefix", "prefix")
        yield c


@pytest.fixture(scope="module")
def answers(server, v1) -> dict:
    """tritonclient's answers, asked from its own venv (made here on first use)."""
    try:
        python = tritonclient_python()
    except RuntimeError as e:
        pytest.fail(str(e))
    spec = json.dumps({"prompt": PROMPT, "max_tokens": N})
    done = subprocess.run([str(python), str(CLIENT_SCRIPT), server.target,
                           v1.server_info().model, spec],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def greedy(v1: Client, adapter: str | None, prompt: str = PROMPT) -> str:
    return v1.generate(prompt, adapter=adapter, sampling=Sampling(max_new_tokens=N,
                                                                  ignore_eos=True)).text


def test_readiness_and_metadata(answers, v1):
    base = v1.server_info().model
    assert (answers["live"], answers["ready"], answers["server"]) == (True, True, "peftserve")
    assert answers["model_ready"] == {base: True, "lora": True, "no-such-adapter": False}
    meta = answers["lora_metadata"]
    assert meta["name"] == "lora" and meta["platform"] == "peftserve_lora"
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("text_input", "BYTES")]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("text_output", "BYTES")]
    assert answers["unknown_metadata"] == "StatusCode.NOT_FOUND"


def test_infer_equals_peftserve_v1(answers, v1):
    base = v1.server_info().model
    texts = {}
    for model, adapter in ((base, None), ("lora", "lora"), ("prefix", "prefix")):
        got = answers["infer"][model]
        assert "error" not in got, got
        assert got["texts"] == [greedy(v1, adapter)]
        assert (got["model"], got["id"]) == (model, "kserve-1")
        assert got["parameters"] == {"finish_reason": "length", "completion_tokens": N,
                                     "prompt_tokens": got["parameters"]["prompt_tokens"]}
        texts[model] = got["texts"][0]
    assert len(set(texts.values())) == 3, "an adapter changed nothing"


def test_batch_and_seeded_sampling(answers, v1):
    assert answers["batch"]["texts"] == [greedy(v1, "lora"), greedy(v1, "lora", "hello world")]
    want = v1.generate(PROMPT, adapter="lora", sampling=Sampling(
        max_new_tokens=N, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7)).text
    assert answers["seeded"]["texts"] == [want]


def test_errors(answers):
    assert answers["unknown_model"]["error"] == "StatusCode.NOT_FOUND"
    assert "no-such-adapter" in answers["unknown_model"]["message"]
    assert answers["bad_parameter"]["error"] == "StatusCode.INVALID_ARGUMENT"
    assert "beam_width" in answers["bad_parameter"]["message"]
