"""What a hostile client written from the proto alone sends gets a clear status: unparseable
messages, paths the file system refuses, huge echoed values, non-finite sampling values,
unknown chat roles, megabyte prompts, a reserved adapter name, adapter files changed on disk.
Never INTERNAL, never a traceback, and the server goes on serving."""

from __future__ import annotations

import logging
import os
import time

import grpc
import pytest

from peftserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    Sampling,
)
from peftserve.v1 import adapters_pb2, generate_pb2
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN

SERVICE = "/peftserve.v1.PeftServe/"
MAX_PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("adapter-root")
    A.make_lora(tiny_llama_dir, root / "a", r=4, seed=1)
    A.make_lora(tiny_llama_dir, root / "b", r=4, seed=2)
    A.make_lora(tiny_llama_dir, root / "same-shapes", r=4, seed=3)
    os.symlink(root / "loop", root / "loop")
    inner = A.make_lora(tiny_llama_dir, root / "inner-loop", r=4)
    os.symlink(inner / "self", inner / "self")
    deep = root / "deep"
    deep.mkdir()
    (deep / "adapter_config.json").write_text("[" * 100_000)
    return root


@pytest.fixture(scope="module")
def server(start_server, token_file, root):
    return start_server("--adapter-root", str(root), "--admin-token-file", str(token_file),
                        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-cpu-adapters", "1")


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=30, admin_token=ADMIN_TOKEN) as c:
        yield c


def raw_call(server, method: str, data: bytes, token: str | None = None) -> grpc.RpcError:
    """Sends `data` as the request message, unparsed, and returns the error it gets."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(server.target) as channel:
        if method == "GenerateStream":
            call = channel.unary_stream(SERVICE + method)
            send = lambda: list(call(data, timeout=30, metadata=metadata))  # noqa: E731
        else:
            call = channel.unary_unary(SERVICE + method)
            send = lambda: call(data, timeout=30, metadata=metadata)  # noqa: E731
        with pytest.raises(grpc.RpcError) as e:
            send()
    return e.value


def bad_utf8(method: str) -> bytes:
    """A message whose string field holds bytes that are not UTF-8."""
    if method == "GetAdapter":
        pb = adapters_pb2.GetAdapterRequest(name="PLACEHOLDER")
    else:
        pb = generate_pb2.GenerateRequest(prompt="PLACEHOLDER")
    return pb.SerializeToString().replace(b"PLACEHOLDER", bytes(range(0xF5, 0x100)))


MALFORMED = {
    "random bytes": lambda method: bytes(range(256)) * 3,
    "truncated": lambda method: generate_pb2.GenerateRequest(
        prompt="x" * 300).SerializeToString()[:50],
    "invalid utf-8": bad_utf8,
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "GetAdapter"])
def test_unparseable_messages_are_invalid_argument(server, method, what):
    error = raw_call(server, method, MALFORMED[what](method))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "is not a valid" in error.details()


def test_the_admin_token_is_checked_before_the_message_is_looked_at(server):
    data = MALFORMED["random bytes"]("")
    assert raw_call(server, "RegisterAdapter", data).code() == grpc.StatusCode.UNAUTHENTICATED
    assert raw_call(server, "RegisterAdapter", data, "wrong").code() == \
        grpc.StatusCode.PERMISSION_DENIED
    assert raw_call(server, "RegisterAdapter", data, ADMIN_TOKEN).code() == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_a_flood_of_malformed_messages_logs_a_line_now_and_then(server):
    def lines() -> int:
        return server.log_path.read_text().count("malformed ")

    before, t0 = lines(), time.monotonic()
    for _ in range(30):
        raw_call(server, "Generate", MALFORMED["random bytes"](""))
    allowed = 1 + int((time.monotonic() - t0) / 10)  # one line per 10 s, whatever the rate
    assert lines() >= 1 and lines() - before <= allowed
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.parametrize("path, message", [
    ("x" * 300, "File name too long"),
    ("a/" + "y" * 5000, "File name too long"),
    ("loop", "cannot be read"),
    ("inner-loop", "symlink|loop|Too many levels"),
    ("deep", "nested too deeply"),
])
def test_paths_and_configs_the_file_system_refuses_are_invalid_argument(client, path, message):
    with pytest.raises(InvalidArgumentError, match=message) as e:
        client.register_adapter("p", path)
    assert "internal" not in str(e.value).lower()


def test_echoed_values_are_cut_short(client, server):
    huge = "n" * 20_000
    with pytest.raises(NotFoundError) as e:
        client.generate("hi", adapter=huge)
    assert len(str(e.value)) < 400 and "20000 characters" in str(e.value)
    with pytest.raises(InvalidArgumentError) as e:
        client.register_adapter(huge, "a")
    assert len(str(e.value)) < 400
    with pytest.raises(InvalidArgumentError) as e:
        client.register_adapter("p", "z" * 12_000)
    assert len(str(e.value)) < 1200
    with pytest.raises(InvalidArgumentError):
        client.generate(messages=[{"role": "r" * 20_000, "content": "x"}])


@pytest.mark.parametrize("sampling, message", [
    (Sampling(temperature=float("inf")), "temperature"),
    (Sampling(temperature=1e38), "temperature"),
    (Sampling(repetition_penalty=float("inf")), "repetition_penalty"),
    (Sampling(repetition_penalty=1e30), "repetition_penalty"),
])
def test_non_finite_or_absurd_sampling_values_are_refused(client, sampling, message):
    with pytest.raises(InvalidArgumentError, match=message):
        client.generate("hi", sampling=sampling)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "content": "x"}], "role is 'tool'"),
    ([{"role": "", "content": "x"}], "role is ''"),
    ([{"role": "user", "content": ""}], r"messages\[0\].content is empty"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": ""}],
     r"messages\[1\].content is empty"),
])
def test_unknown_roles_and_empty_turns_are_refused(client, messages, message):
    with pytest.raises(InvalidArgumentError, match=message):
        client.generate(messages=messages)


def test_a_megabyte_prompt_is_refused_without_tokenizing_it(client):
    t0 = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="characters"):
        client.generate("the quick brown fox " * 250_000)  # 5 MB
    assert time.monotonic() - t0 < 5.0  # tokenizing it took seconds of the server's CPU


def test_the_metrics_overflow_label_is_not_an_adapter_name(client):
    with pytest.raises(InvalidArgumentError, match="reserved"):
        client.register_adapter("other", "a")


def test_weights_changed_on_disk_fail_that_adapter_with_failed_precondition(client, root):
    client.register_adapter("a", "a")
    client.register_adapter("b", "b")  # one adapter in host memory: "a" goes back to disk
    assert client.get_adapter("a").residency == "disk"
    (root / "a" / "adapter_model.safetensors").write_bytes(
        (root / "same-shapes" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FailedPreconditionError, match="changed on disk since"):
        client.generate("hi", adapter="a", sampling=Sampling(max_new_tokens=2))
    assert client.generate("hi", adapter="b", sampling=Sampling(max_new_tokens=2)).text is not None


def test_still_serving_after_all_that(client, server):
    assert client.health() == "SERVING"
    out = client.generate("still there?", sampling=Sampling(max_new_tokens=2, ignore_eos=True))
    assert out.completion_tokens == 2
    log = server.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log


def test_a_response_the_client_left_before_is_one_warning_line(caplog):
    """grpc's own ERROR + traceback when it cannot send to a client that is gone (the soak's
    short deadlines provoke it) becomes one WARNING line."""
    from peftserve.grpc import log_filters

    log_filters.install()
    logger = logging.getLogger(log_filters.GRPC_CORE_LOGGER)
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        with caplog.at_level(logging.INFO, logger=log_filters.GRPC_CORE_LOGGER):
            logger.exception("ExecuteBatchError raised in core by servicer method [%s]",
                             "/peftserve.v1.PeftServe/GetAdapter")
            logger.error("Unexpected [Oops] raised by servicer method [/x]")
    gone, other = caplog.records
    assert gone.levelname == "WARNING" and gone.exc_info is None
    assert "GetAdapter" in gone.getMessage() and "client gone" in gone.getMessage()
    assert other.levelname == "ERROR"  # anything else stays an error
