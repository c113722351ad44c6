"""`peftserve bench` (the real CLI, in a subprocess) against a real server: reports per kind, the
cross-check against the server's Prometheus histograms, errors by status code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftserve.client import Client
from peftserve.client import loadgen as L
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN

ADAPTERS = ("lora", "prefix", "tmpl")


@pytest.fixture(scope="module")
def server(start_server, token_file, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-adapters")
    A.make_lora(tiny_llama_dir, root / "lora", r=4, seed=1)
    A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=4, seed=2)
    A.make_template(root / "tmpl")
    server = start_server("--adapter-root", str(root), "--admin-token-file", str(token_file))
    with Client(server.target, admin_token=ADMIN_TOKEN, timeout=60) as c:
        for name in ADAPTERS:
            c.register_adapter(name, name)
    return server


def bench(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftserve.cli", "bench", "--server", target,
                           "--prompt-len", "3-10", "--output-len", "2-6", *args],
                          capture_output=True, text=True, timeout=300)


def test_closed_loop_reports_every_kind_and_agrees_with_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    proc = bench(server.target, "--concurrency", "4", "--num-requests", "24",
                 "--metrics-url", server.metrics_url, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["overall"]["requests"] == r["overall"]["ok"] == 24
    assert r["errors"] == {}
    # Every registered adapter and base were named; the kinds come from the server.
    assert set(r["by_adapter"]) == {L.BASE, *ADAPTERS}
    assert set(r["by_kind"]) == {"base", "lora", "prefix_tuning", "prompt_template"}
    # The same seed plans the same requests, and the server generated exactly what was planned.
    spec = L.LoadSpec(adapters=(L.BASE, *ADAPTERS), concurrency=4, max_requests=24,
                      prompt_len=L.Lengths.parse("3-10"), output_len=L.Lengths.parse("2-6"))
    planned = list(L.plan(spec))
    assert [(p.adapter, p.max_new_tokens) for p in planned] == \
        [(rec["adapter"], rec["completion_tokens"]) for rec in r["records"]]
    assert r["overall"]["completion_tokens"] == sum(p.max_new_tokens for p in planned)
    # The server saw every request and token the client did; the client's TTFT includes the
    # transport, so its mean is never below the server's (exact sum / count).
    check = r["server_cross_check"]
    for kind in r["by_kind"]:
        for metric in ("ttft", "inter_token", "e2e"):
            c = check[f"{metric}/{kind}"]
            assert c["count_match"], (metric, kind, c)
        assert check[f"ttft/{kind}"]["client_minus_server_mean_ms"] >= 0
        assert check[f"e2e/{kind}"]["client_minus_server_mean_ms"] >= 0
    assert "server cross-check: counts match" in proc.stdout


def test_open_loop_sends_the_planned_poisson_arrivals(server, tmp_path):
    out = tmp_path / "open.json"
    proc = bench(server.target, "--rate", "20", "--duration", "1.5", "--popularity", "zipf",
                 "--adapters", "base,lora", "--seed", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    spec = L.LoadSpec(adapters=(L.BASE, "lora"), rate=20, duration_s=1.5, popularity="zipf",
                      seed=3, prompt_len=L.Lengths.parse("3-10"),
                      output_len=L.Lengths.parse("2-6"))
    planned = list(L.plan(spec))
    assert len(planned) > 5
    assert r["overall"]["requests"] == r["overall"]["ok"] == len(planned)
    # Open loop: each request left at its planned offset, not when an earlier one finished.
    for p, rec in zip(planned, r["records"], strict=True):
        assert rec["sent_s"] == pytest.approx(p.at_s, abs=0.25)


def test_unknown_adapter_is_refused_before_any_load(server):
    proc = bench(server.target, "--adapters", "base,nope", "--num-requests", "2")
    assert proc.returncode == 2
    assert "not registered" in proc.stderr and "nope" in proc.stderr


def test_errors_are_counted_by_status_code(start_server, tmp_path):
    # One stream at a time: a closed loop of 6 sees RESOURCE_EXHAUSTED and still finishes.
    small = start_server("--max-concurrent-streams", "1")
    out = tmp_path / "errors.json"
    proc = bench(small.target, "--concurrency", "6", "--num-requests", "18", "--output-len", "8",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["overall"]["requests"] == 18
    assert r["errors"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert r["overall"]["ok"] + r["errors"]["RESOURCE_EXHAUSTED"] == 18
    assert "RESOURCE_EXHAUSTED" in proc.stdout
