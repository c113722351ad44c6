"""Generate / GenerateStream on the base model through a real server and the real clients;
health, reflection, the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from peftserve.client import AsyncClient, Client, Sampling

MAX_PROMPT_TOKENS = 200


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-prompt-tokens", str(MAX_PROMPT_TOKENS))


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=30) as c:
        yield c


def test_health_is_serving(client):
    assert client.health() == "SERVING"
    assert client.health("peftserve.v1.PeftServe") == "SERVING"


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"peftserve.v1.PeftServe", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("peftserve.v1.PeftServe")
        assert desc.name == "peftserve/v1/service.proto"
        methods = {m.name for m in desc.service[0].method}
        assert {"Generate", "GenerateStream", "RegisterAdapter", "ServerInfo"} <= methods


def test_generate_unary(client):
    out = client.generate("the quick brown fox", sampling=Sampling(max_new_tokens=8,
                                                                   ignore_eos=True))
    assert out.finish_reason == "length"
    assert out.completion_tokens == len(out.token_ids) == 8
    assert out.prompt_tokens > 0
    assert out.adapter_kind == "base"
    assert out.request_id
    t = out.timings
    assert t.queue_s is not None and t.ttft_s is not None and t.total_s is not None
    assert 0 <= t.queue_s <= t.ttft_s <= t.total_s


def test_stream_matches_unary(client):
    messages = [{"role": "user", "content": "hello world, how are you today?"}]
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    whole = client.generate(messages=messages, sampling=sampling)
    chunks = list(client.generate_stream(messages=messages, sampling=sampling))
    assert len(chunks) >= 2
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[0].timings is not None and chunks[0].timings.ttft_s is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens) == (whole.prompt_tokens, 12)
    assert last.timings is not None and last.timings.total_s is not None


def test_token_ids_input_and_logprobs(client):
    out = client.generate(token_ids=[5, 17, 42, 99], sampling=Sampling(
        max_new_tokens=6, ignore_eos=True, logprobs=True))
    assert out.prompt_tokens == 4
    assert len(out.logprobs) == len(out.token_ids) == 6
    assert all(lp <= 0 for lp in out.logprobs)


def test_seeded_sampling_is_reproducible(client):
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234,
                        ignore_eos=True)
    a = client.generate("low rank adaptation", sampling=sampling)
    b = client.generate("low rank adaptation", sampling=sampling)
    assert a.token_ids == b.token_ids


def test_stop_token_ends_the_request(client):
    prompt = "peftserve serves many adapters"
    free = client.generate(prompt, sampling=Sampling(max_new_tokens=16, ignore_eos=True))
    i = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    stopped = client.generate(prompt, sampling=Sampling(
        max_new_tokens=16, ignore_eos=True, stop_token_ids=(free.token_ids[i],)))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids[:i] == free.token_ids[:i]
    assert stopped.completion_tokens == i + 1


def test_server_info_reports_limits_and_load(client):
    info = client.server_info()
    assert info.limits.max_prompt_tokens == MAX_PROMPT_TOKENS
    assert info.limits.max_model_len == 512
    assert info.limits.max_new_tokens >= 1
    assert info.load.kv_blocks_total == 256
    assert (info.device, info.dtype, info.kernel_backend) == ("cpu", "float32", "cpp")


def test_async_client_streams_concurrently(server):
    async def one(c: AsyncClient, n: int) -> tuple[int, int]:
        tokens, last = 0, None
        async for chunk in c.generate_stream(f"count {n}", sampling=Sampling(
                max_new_tokens=n, ignore_eos=True)):
            tokens += len(chunk.token_ids)
            last = chunk
        assert last is not None
        return tokens, last.completion_tokens

    async def main() -> list[tuple[int, int]]:
        async with AsyncClient(server.target, timeout=30) as c:
            return await asyncio.gather(*(one(c, n) for n in (3, 7, 11, 5)))

    assert asyncio.run(main()) == [(3, 3), (7, 7), (11, 11), (5, 5)]


def test_cli_generate_streams_to_the_terminal(server):
    proc = subprocess.run(
        [sys.executable, "-m", "peftserve.cli", "generate", "--server", server.target,
         "--max-new-tokens", "6", "--ignore-eos", "hello", "world"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "6 generated tokens, finish: length, adapter kind: base" in proc.stderr


def test_cli_info_and_errors(server):
    info = subprocess.run([sys.executable, "-m", "peftserve.cli", "info", "--server",
                           server.target], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["limits"]["max_prompt_tokens"] == MAX_PROMPT_TOKENS
    bad = subprocess.run([sys.executable, "-m", "peftserve.cli", "generate", "--server",
                          server.target, "--adapter", "no-such-adapter", "hi"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_client_package_does_not_import_torch():
    code = ("import sys, peftserve.client, peftserve.client.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
