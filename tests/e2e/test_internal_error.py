"""An unexpected exception becomes INTERNAL with no detail for the client, is logged with the
request id, and the server keeps serving. The real gRPC server and client, in-process, with an
engine that fails on purpose (a real engine offers no honest way to crash)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from grpc_health.v1._async import HealthServicer

from peftserve.client import AsyncClient, InternalError
from peftserve.engine.request import RequestOutput, Timings
from peftserve.engine.sequence import FinishReason
from peftserve.grpc.adapter_files import AdapterFiles
from peftserve.grpc.server import build_server
from peftserve.grpc.servicer import PeftServeServicer
from peftserve.metrics import Metrics
from peftserve.serve_config import ServeConfig

SECRET = "secret-detail-of-the-bug"


class FailingOnceEngine:
    """Stands in for AsyncEngine: the first request raises, later ones produce one token."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, req):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError(SECRET)
        yield RequestOutput(req.request_id, "ok", [7], None, True, FinishReason.LENGTH, 3, 1,
                            Timings(0.0, 0.01, 0.02))


def test_unexpected_error_is_internal_without_detail(tmp_path, caplog):
    config = ServeConfig(port=0, metrics_port=None, staging_dir=tmp_path)
    metrics = Metrics()
    files = AdapterFiles(None, tmp_path, config.max_inline_adapter_bytes)
    servicer = PeftServeServicer(FailingOnceEngine(), config, metrics, files)  # type: ignore[arg-type]

    async def main() -> None:
        server = build_server(config, servicer, HealthServicer())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
                with pytest.raises(InternalError) as e:
                    await client.generate("x")
                assert SECRET not in e.value.details and "Traceback" not in e.value.details
                assert e.value.request_id and e.value.request_id in e.value.details
                again = await client.generate("x")
                assert (again.text, again.finish_reason) == ("ok", "length")
                failed_id = e.value.request_id
        finally:
            await server.stop(None)
        logged = [r for r in caplog.records if r.name == "peftserve.grpc.errors"]
        assert any(failed_id in r.getMessage() and r.exc_info for r in logged)

    with caplog.at_level(logging.ERROR, logger="peftserve.grpc.errors"):
        asyncio.run(main())
    assert metrics.registry.get_sample_value("peftserve_requests_total", {
        "adapter_kind": "base", "adapter": "__base__", "outcome": "internal"}) == 1
