"""A TLS server without an adapter root: TLS only, the concurrency cap, FAILED_PRECONDITION for
by-path registration, and a SIGTERM that drains in-flight streams and exits 0."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from peftserve.client import (
    Client,
    FailedPreconditionError,
    ResourceExhaustedError,
    Sampling,
    UnavailableError,
)
from tests.e2e.server_process import wait_for

MAX_STREAMS = 2
LONG = 480  # new tokens: about a second on the tiny model


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(start_server, cert):
    return start_server("--tls-cert", str(cert[0]), "--tls-key", str(cert[1]),
                        "--max-concurrent-streams", str(MAX_STREAMS), "--grace-period-s", "30")


def test_tls_only(server, cert):
    with Client(server.target, tls_ca=cert[0], timeout=30) as client:
        out = client.generate("over tls", sampling=Sampling(max_new_tokens=3, ignore_eos=True))
        assert out.completion_tokens == 3
        assert client.health() == "SERVING"
    with Client(server.target, timeout=3) as plaintext, pytest.raises(UnavailableError):
        plaintext.generate("no tls")


def test_register_by_path_needs_an_adapter_root(server, cert):
    with Client(server.target, tls_ca=cert[0], timeout=30) as client:
        assert client.server_info().adapter_root_configured is False
        with pytest.raises(FailedPreconditionError, match="adapter root"):
            client.register_adapter("a", "some/dir")


def test_concurrency_cap_then_sigterm_drains_in_flight_streams(server, cert):
    client = Client(server.target, tls_ca=cert[0], timeout=60)
    results: dict[int, list] = {}
    started = [threading.Event() for _ in range(MAX_STREAMS)]

    def consume(i: int) -> None:
        chunks = []
        for chunk in client.generate_stream(f"drain {i}", sampling=Sampling(
                max_new_tokens=LONG, ignore_eos=True)):
            chunks.append(chunk)
            started[i].set()
        results[i] = chunks

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(MAX_STREAMS)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30)
    with pytest.raises(ResourceExhaustedError, match="too many requests in flight"):
        client.generate("one more", sampling=Sampling(max_new_tokens=2))

    t_term = time.monotonic()
    assert server.proc is not None
    server.proc.send_signal(15)
    wait_for(lambda: any("draining" in line for line in server.lines), timeout=10,
             what="the server to start draining")
    with pytest.raises(UnavailableError):
        client.generate("after sigterm", sampling=Sampling(max_new_tokens=2), timeout=5)
    assert all(t.is_alive() for t in threads), "the streams ended before the drain was tested"
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0
    assert time.monotonic() - t_term < 30
    for i in range(MAX_STREAMS):
        last = results[i][-1]
        assert (last.finish_reason, last.completion_tokens) == ("length", LONG)
        assert sum(len(c.token_ids) for c in results[i]) == LONG
    assert "peftserve stopped" in server.lines
    client.close()
