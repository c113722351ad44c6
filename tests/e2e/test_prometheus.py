"""A real Prometheus (Debian package `prometheus`; .ci/run installs it) scrapes the server
during a short mixed load; TTFT quantiles per adapter kind come back through its query API."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

from peftserve.client import AsyncClient, Client, Sampling
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN
from tests.e2e.server_process import metric, scrape, wait_for

REQUESTS_PER_KIND = 6
KINDS = {None: "base", "lora": "lora", "prefix": "prefix_tuning"}


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("the `prometheus` binary is missing: `apt-get install -y prometheus` "
                    "(.ci/run installs it); this test does not pass without it")
    return path


@pytest.fixture(scope="module")
def server(start_server, token_file, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prom-adapters")
    A.make_lora(tiny_llama_dir, root / "lora", r=4, seed=1)
    A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=4, seed=2)
    server = start_server("--adapter-root", str(root), "--admin-token-file", str(token_file))
    with Client(server.target, admin_token=ADMIN_TOKEN, timeout=60) as c:
        for name in ("lora", "prefix"):
            c.register_adapter(name, name)
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, server, tmp_path_factory):
    d = tmp_path_factory.mktemp("prometheus")
    metrics_target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    (d / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: peftserve\n"
        f"    static_configs: [{{targets: ['{metrics_target}']}}]\n")
    port = free_port()
    log = (d / "prometheus.log").open("w")
    proc = subprocess.Popen([prometheus_bin, f"--config.file={d / 'prometheus.yml'}",
                             f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        wait_for(lambda: _up(api), timeout=60, every=0.5, what="Prometheus to scrape the server")
        yield api
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _up(api: str) -> bool:
    try:
        result = query(api, 'up{job="peftserve"}')
    except OSError:
        return False
    return bool(result) and result[0]["value"][1] == "1"


def query(api: str, promql: str) -> list[dict]:
    url = f"{api}?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_ttft_quantiles_per_adapter_kind(server, prometheus):
    async def load() -> dict[str, list[float]]:
        ttfts: dict[str, list[float]] = {kind: [] for kind in KINDS.values()}
        async with AsyncClient(server.target, timeout=60) as c:
            async def one(adapter: str | None, i: int) -> None:
                out = await c.generate(f"request {i}", adapter=adapter,
                                       sampling=Sampling(max_new_tokens=8, ignore_eos=True))
                assert out.timings.ttft_s is not None
                ttfts[out.adapter_kind].append(out.timings.ttft_s)

            for wave in range(REQUESTS_PER_KIND // 2):  # a few waves, scraped as they run
                await asyncio.gather(*(one(a, wave * 2 + j) for a in KINDS for j in range(2)))
                await asyncio.sleep(0.5)
        return ttfts

    ttfts = asyncio.run(load())
    assert {k: len(v) for k, v in ttfts.items()} == {k: REQUESTS_PER_KIND for k in KINDS.values()}

    counts = 'sum by (adapter_kind) (peftserve_request_ttft_seconds_count{job="peftserve"})'
    wait_for(lambda: {r["metric"]["adapter_kind"]: float(r["value"][1])
                      for r in query(prometheus, counts)}
             == {k: REQUESTS_PER_KIND for k in KINDS.values()},
             timeout=20, every=0.5, what="Prometheus to see every request")
    for q in (0.5, 0.99):
        result = query(prometheus, f"histogram_quantile({q}, sum by (adapter_kind, le) "
                                   f"(peftserve_request_ttft_seconds_bucket))")
        by_kind = {r["metric"]["adapter_kind"]: float(r["value"][1]) for r in result}
        assert set(by_kind) == set(KINDS.values())
        for kind, value in by_kind.items():
            assert math.isfinite(value) and value > 0, (kind, value)
            # The quantile interpolates inside a bucket: bounded by the slowest TTFT's bucket.
            assert value <= _bucket_upper(max(ttfts[kind])), (kind, value, ttfts[kind])

    per_adapter = query(prometheus, 'sum by (adapter) (peftserve_requests_total'
                                    '{outcome="length"})')
    assert {r["metric"]["adapter"]: float(r["value"][1]) for r in per_adapter} == {
        "__base__": REQUESTS_PER_KIND, "lora": REQUESTS_PER_KIND, "prefix": REQUESTS_PER_KIND}
    samples = scrape(server.metrics_url)
    assert metric(samples, "peftserve_generated_tokens_total", adapter_kind="lora") == \
        8 * REQUESTS_PER_KIND
    assert metric(samples, "peftserve_adapter_loads_total") >= 2
    assert metric(samples, "peftserve_kv_blocks_total") == 256
    assert metric(samples, "peftserve_adapters_resident") == 2
    info = [k for k in samples if k[0] == "peftserve_lora_requests_info"]
    assert len(info) == 1 and ("max_lora", "8") in info[0][1]


def _bucket_upper(seconds: float) -> float:
    from peftserve.metrics import LATENCY_BUCKETS

    return next((b for b in LATENCY_BUCKETS if seconds <= b), math.inf)
