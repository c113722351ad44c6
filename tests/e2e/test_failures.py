"""Every failure a client can provoke gets its status code, frees what the request held, and
leaves the server serving: bad input, unknown adapters, admin token, queue full, deadline,
cancellation mid-stream."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from peftserve.client import (
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    Sampling,
    UnauthenticatedError,
)
from peftserve.v1 import generate_pb2, service_pb2_grpc
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN
from tests.e2e.server_process import metric, scrape, wait_for

MAX_NUM_SEQS = 2
MAX_WAITING = 2
MAX_PROMPT_TOKENS = 64
LONG = Sampling(max_new_tokens=480, ignore_eos=True)  # seconds of work on the tiny model


@pytest.fixture(scope="module")
def staging(tmp_path_factory):
    return tmp_path_factory.mktemp("staging")


@pytest.fixture(scope="module")
def server(start_server, token_file, staging):
    return start_server("--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING),
                        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-new-tokens-limit",
                        "500", "--admin-token-file", str(token_file), "--staging-dir",
                        str(staging), "--max-cpu-adapters", "1")


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=30, admin_token=ADMIN_TOKEN) as c:
        yield c


def idle(client: Client) -> bool:
    load = client.server_info().load
    return (load.num_running, load.num_waiting, load.kv_blocks_used, load.active_streams) == (
        0, 0, 0, 0)


@pytest.fixture(autouse=True)
def still_serving_afterwards(client):
    yield
    wait_for(lambda: idle(client), what="every request and KV block released")
    out = client.generate("still there?", sampling=Sampling(max_new_tokens=2, ignore_eos=True))
    assert out.completion_tokens == 2


def test_unknown_adapter_is_not_found(client):
    with pytest.raises(NotFoundError, match="not registered") as e:
        client.generate("hi", adapter="no-such-adapter")
    assert e.value.request_id
    with pytest.raises(NotFoundError):
        list(client.generate_stream("hi", adapter="no-such-adapter"))
    with pytest.raises(NotFoundError):
        client.get_adapter("no-such-adapter")
    with pytest.raises(NotFoundError):
        client.unregister_adapter("no-such-adapter")


@pytest.mark.parametrize("request_pb, message", [
    (generate_pb2.GenerateRequest(), "prompt, messages or token_ids"),
    (generate_pb2.GenerateRequest(prompt=""), "empty"),
    (generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParameters(
        temperature=-1)), "temperature"),
    (generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParameters(
        top_p=0)), "top_p"),
    (generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParameters(
        max_new_tokens=0)), "max_new_tokens"),
    (generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParameters(
        max_new_tokens=501)), "exceeds the limit"),
    (generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=[1, 10**6])),
     "token id 1000000 from prompt_token_ids is outside"),
    (generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=[1] * 65)),
     f"at most {MAX_PROMPT_TOKENS}"),
    (generate_pb2.GenerateRequest(prompt="the quick brown fox " * 40),
     f"at most {MAX_PROMPT_TOKENS}"),
    (generate_pb2.GenerateRequest(messages=generate_pb2.Messages()), "messages is empty"),
    (generate_pb2.GenerateRequest(adapter="../etc", prompt="x"), "not registered"),
])
def test_bad_requests_are_invalid_argument(server, request_pb, message):
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.PeftServeStub(channel)
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as e:
                call(request_pb, timeout=30)
            expected = (grpc.StatusCode.NOT_FOUND if request_pb.adapter
                        else grpc.StatusCode.INVALID_ARGUMENT)
            assert e.value.code() == expected
            assert message in e.value.details()
            assert "Traceback" not in e.value.details()


def test_client_side_errors_are_typed(client):
    with pytest.raises(InvalidArgumentError, match="temperature"):
        client.generate("x", sampling=Sampling(temperature=-0.5))


def test_admin_rpcs_need_the_token(server):
    files = {"adapter_config.json": b"{}"}
    with Client(server.target, timeout=30) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.register_adapter("a", files=files)
        with pytest.raises(UnauthenticatedError):
            anonymous.unregister_adapter("a")
        assert anonymous.list_adapters() == []  # reads are open
    with Client(server.target, timeout=30, admin_token="wrong-token") as wrong:
        with pytest.raises(PermissionDeniedError):
            wrong.register_adapter("a", files=files)
        with pytest.raises(PermissionDeniedError):
            wrong.unregister_adapter("a")


def test_full_queue_is_resource_exhausted(client, server):
    def load() -> tuple[int, int]:
        info = client.server_info().load
        return info.num_running, info.num_waiting

    # Fill the batch first, then the queue: a burst would find the queue full before the
    # scheduler admits anything from it.
    streams = [client.generate_stream(f"long {i}", sampling=LONG) for i in range(MAX_NUM_SEQS)]
    try:
        wait_for(lambda: load() == (MAX_NUM_SEQS, 0), what="a full batch")
        streams += [client.generate_stream(f"wait {i}", sampling=LONG)
                    for i in range(MAX_WAITING)]
        wait_for(lambda: load() == (MAX_NUM_SEQS, MAX_WAITING), what="a full waiting queue")
        with pytest.raises(ResourceExhaustedError, match="waiting queue is full"):
            client.generate("one too many", sampling=Sampling(max_new_tokens=2))
    finally:
        for s in streams:
            s.cancel()
    samples = scrape(server.metrics_url)
    assert metric(samples, "peftserve_requests_total", outcome="resource_exhausted") >= 1


def test_deadline_exceeded_frees_the_request(client, server):
    # A deadline a third of the way through this machine's own time for the request, so that
    # it expires mid-flight whether the machine is quiet or loaded.
    t0 = time.monotonic()
    client.generate("slow", sampling=LONG)
    deadline = (time.monotonic() - t0) / 3
    got = 0
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        for chunk in client.generate_stream("slow", sampling=LONG, timeout=deadline):
            got += len(chunk.token_ids)
    assert time.monotonic() - t0 < 5
    assert 0 < got < LONG.max_new_tokens, "the deadline must hit a request in flight"
    with pytest.raises(DeadlineExceededError):
        client.generate("slow", sampling=LONG, timeout=deadline)
    wait_for(lambda: idle(client), what="the expired request's KV blocks freed")
    samples = scrape(server.metrics_url)
    assert metric(samples, "peftserve_requests_total", outcome="deadline_exceeded") >= 1


def test_cancel_mid_stream_returns_every_kv_block(client, server):
    before = scrape(server.metrics_url)
    assert metric(before, "peftserve_kv_blocks_used") == 0
    stream = client.generate_stream("cancel me", sampling=LONG)
    got = 0
    for chunk in stream:
        got += len(chunk.token_ids)
        if got >= 20:
            break
    during = client.server_info().load
    assert during.num_running == 1 and during.kv_blocks_used >= 2  # prompt + 20 tokens
    stream.cancel()
    wait_for(lambda: idle(client), what="the cancelled stream's KV blocks freed")
    after = scrape(server.metrics_url)
    assert metric(after, "peftserve_kv_blocks_used") == 0
    assert metric(after, "peftserve_requests_running") == 0
    assert metric(after, "peftserve_active_streams") == 0
    cancelled = metric(after, "peftserve_requests_total", outcome="cancelled")
    assert cancelled == metric(before, "peftserve_requests_total", outcome="cancelled") + 1


def test_adapter_broken_on_disk_is_failed_precondition(client, tiny_llama_dir, tmp_path, staging):
    """Host memory holds one adapter: registering a second sends the first back to disk, where
    its file is then damaged; using it must fail that request only, with the reason."""
    first = client.register_adapter("first", directory=A.make_lora(tiny_llama_dir,
                                                                   tmp_path / "a", r=2))
    client.register_adapter("second", directory=A.make_lora(tiny_llama_dir, tmp_path / "b",
                                                            r=2, seed=1))
    try:
        assert client.get_adapter("first").residency == "disk"
        weights = staging / Path(first.source).name / "adapter_model.safetensors"
        weights.write_bytes(b"damaged")
        with pytest.raises(FailedPreconditionError, match="'first' failed to load"):
            client.generate("x", adapter="first", sampling=Sampling(max_new_tokens=2))
        out = client.generate("x", adapter="second", sampling=Sampling(max_new_tokens=2,
                                                                        ignore_eos=True))
        assert out.adapter_kind == "lora" and out.completion_tokens == 2
    finally:
        client.unregister_adapter("first")
        client.unregister_adapter("second")
    assert list(staging.iterdir()) == []
