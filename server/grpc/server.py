"""`peftserve serve`: the engine, the gRPC server (with health and reflection), the metrics
endpoint, and a graceful drain on SIGTERM.

On start-up it prints one line, `peftserve listening on HOST:PORT metrics HOST:PORT`, with the
ports actually bound (so port 0 works).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import Engine
from peftserve.engine.stats import EngineStats
from peftserve.gateway import Gateway
from peftserve.grpc import log_filters
from peftserve.grpc.adapter_files import AdapterFiles
from peftserve.grpc.interceptors import ApiInterceptor
from peftserve.grpc.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from peftserve.grpc.kserve import KServeServicer
from peftserve.grpc.ports import PortInUse, check_free
from peftserve.grpc.servicer import PeftServeServicer
from peftserve.kserve_v2 import grpc_predict_v2_pb2_grpc
from peftserve.metrics import Metrics
from peftserve.openai_http.app import build_app
from peftserve.openai_http.server import HttpServer
from peftserve.serve_config import ServeConfig
from peftserve.v1 import service_pb2, service_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["PeftServe"].full_name
SCRAPE_SNAPSHOT_TIMEOUT_S = 5.0  # a scrape waits this long for the engine thread's snapshot
MESSAGE_OVERHEAD = 1 << 20  # room for the non-file fields of an inline registration


def serve(config: ServeConfig) -> int:
    """Loads the model, serves until SIGTERM/SIGINT, drains, returns the exit status: 1, with
    one line on stderr, when it cannot start (a port in use)."""
    try:
        check_free(config)  # before the model loads and anything is created
    except PortInUse as e:
        print(f"peftserve serve: {e}", file=sys.stderr)
        return 1
    async_engine = AsyncEngine()
    async_engine.start(lambda: Engine.from_config(config.engine))
    try:
        return asyncio.run(_serve(config, async_engine))
    except (OSError, RuntimeError) as e:  # a port taken since the check, an unreadable TLS file
        async_engine.shutdown()
        print(f"peftserve serve: cannot start: {e}", file=sys.stderr)
        return 1


async def _serve(config: ServeConfig, async_engine: AsyncEngine) -> int:
    loop = asyncio.get_running_loop()
    metrics = Metrics(config.metrics_max_adapter_labels)
    metrics.engine.refresh = lambda: _snapshot_from(loop, async_engine)
    files = AdapterFiles(config.adapter_root, config.staging_dir, config.max_inline_adapter_bytes)
    gateway = Gateway(async_engine, config, metrics)
    servicer = PeftServeServicer(async_engine, config, metrics, files, gateway)
    health = HealthServicer()
    server = build_server(config, servicer, health, KServeServicer(gateway))
    address = f"{config.host}:{config.port}"
    if config.tls:
        assert config.tls_cert is not None and config.tls_key is not None
        creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(),
                                              config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    http = None
    metrics_address = "off"
    if config.metrics_port is not None:
        http, _ = start_http_server(config.metrics_port, config.metrics_host, metrics.registry)
        metrics_address = f"{config.metrics_host}:{http.server_port}"
    http_server = await _start_http(config, gateway, files)
    http_address = "" if http_server is None else f" http {config.host}:{http_server.port}"
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    print(f"peftserve listening on {config.host}:{port} metrics {metrics_address}{http_address}",
          flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.warning("draining: no new requests; in-flight ones get %.0fs", config.grace_period_s)
    print(f"peftserve draining ({servicer.active_streams} requests in flight)", flush=True)
    await health.enter_graceful_shutdown()
    async_engine.stop_admitting()
    stopping = [server.stop(config.grace_period_s)]  # refuses new calls, waits for in-flight
    if http_server is not None:
        stopping.append(http_server.stop())
    await asyncio.gather(*stopping)
    async_engine.shutdown()
    files.close()
    if http is not None:
        http.shutdown()
    print("peftserve stopped", flush=True)
    return 0


def build_server(config: ServeConfig, servicer: PeftServeServicer, health: HealthServicer,
                 kserve: KServeServicer | None = None) -> grpc.aio.Server:
    log_filters.install()
    server = grpc.aio.server(
        interceptors=[ApiInterceptor(config.admin_token)],
        options=[("grpc.max_receive_message_length",
                  config.max_inline_adapter_bytes + MESSAGE_OVERHEAD),
                 ("grpc.so_reuseport", 0)])
    service_pb2_grpc.add_PeftServeServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME]
    if kserve is not None:
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)
        names.append(KSERVE_SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return server


async def _start_http(config: ServeConfig, gateway: Gateway,
                      files: AdapterFiles) -> HttpServer | None:
    if config.http_port is None:
        return None
    http = HttpServer(build_app(gateway, files, config.admin_token), config.host,
                      config.http_port, config.grace_period_s)
    await http.start()
    return http


def _snapshot_from(loop: asyncio.AbstractEventLoop, engine: AsyncEngine) -> EngineStats | None:
    """Called on the metrics HTTP thread: asks the engine thread for a snapshot between steps."""

    try:
        return asyncio.run_coroutine_threadsafe(engine.stats(), loop).result(
            SCRAPE_SNAPSHOT_TIMEOUT_S)
    except (FutureTimeout, RuntimeError) as e:  # a long step, or the loop is closing
        log.warning("metrics scrape without a fresh engine snapshot: %r", e)
        return None

