"""uvicorn serving the OpenAI-compatible app inside the gRPC server's event loop, so both fronts
share one engine, one gateway and one drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """`peftserve serve` handles SIGTERM/SIGINT itself and drains every front."""
        yield


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, grace_period_s: float) -> None:
        self._sock = socket.create_server((host, port), family=_family(host), backlog=2048,
                                          reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=grace_period_s)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Refuses new connections, lets in-flight requests finish (up to the grace period)."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
