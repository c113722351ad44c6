"""asyncio client: the same calls as `Client`, awaitable; streams are async iterators.

    async with AsyncClient("127.0.0.1:50051") as c:
        async for chunk in c.generate_stream("Hello", adapter="sentiment"):
            print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from peftserve.client import convert
from peftserve.client.channel import DEFAULT_TARGET, ChannelConfig
from peftserve.client.errors import from_rpc_error
from peftserve.client.types import AdapterInfo, Chunk, Completion, Sampling, ServerInfo
from peftserve.v1 import adapters_pb2, server_info_pb2, service_pb2_grpc


class AsyncClient:
    def __init__(self, target: str = DEFAULT_TARGET, *, tls: bool = False,
                 tls_ca: str | Path | None = None, admin_token: str | None = None,
                 timeout: float | None = None) -> None:
        self.config = ChannelConfig(target, tls, Path(tls_ca) if tls_ca else None, admin_token)
        self.timeout = timeout
        creds = self.config.credentials()
        self._channel = (grpc.aio.secure_channel(target, creds, self.config.options) if creds
                         else grpc.aio.insecure_channel(target, self.config.options))
        self._stub = service_pb2_grpc.PeftServeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout: float | None,
                    metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def generate(self, prompt: str | None = None, *,
                       messages: Sequence[Mapping[str, str]] | None = None,
                       token_ids: Sequence[int] | None = None, adapter: str | None = None,
                       sampling: Sampling | None = None, request_id: str | None = None,
                       timeout: float | None = None) -> Completion:
        req = convert.generate_request(prompt, messages, token_ids, adapter, sampling, request_id)
        return convert.completion(await self._call(self._stub.Generate, req, timeout))

    def generate_stream(self, prompt: str | None = None, *,
                        messages: Sequence[Mapping[str, str]] | None = None,
                        token_ids: Sequence[int] | None = None, adapter: str | None = None,
                        sampling: Sampling | None = None, request_id: str | None = None,
                        timeout: float | None = None) -> AsyncStream:
        req = convert.generate_request(prompt, messages, token_ids, adapter, sampling, request_id)
        return AsyncStream(self._stub.GenerateStream(req, timeout=timeout or self.timeout))

    async def register_adapter(self, name: str, path: str | None = None, *,
                               directory: str | Path | None = None,
                               files: Mapping[str, bytes] | None = None, replace: bool = False,
                               timeout: float | None = None) -> AdapterInfo:
        req = convert.register_request(name, path, directory, files, replace)
        resp = await self._call(self._stub.RegisterAdapter, req, timeout,
                                self.config.admin_metadata())
        return convert.adapter(resp.adapter)

    async def unregister_adapter(self, name: str, timeout: float | None = None) -> None:
        await self._call(self._stub.UnregisterAdapter,
                         adapters_pb2.UnregisterAdapterRequest(name=name), timeout,
                         self.config.admin_metadata())

    async def list_adapters(self, timeout: float | None = None) -> list[AdapterInfo]:
        resp = await self._call(self._stub.ListAdapters, adapters_pb2.ListAdaptersRequest(),
                                timeout)
        return [convert.adapter(a) for a in resp.adapters]

    async def get_adapter(self, name: str, timeout: float | None = None) -> AdapterInfo:
        return convert.adapter(await self._call(self._stub.GetAdapter,
                                                adapters_pb2.GetAdapterRequest(name=name),
                                                timeout))

    async def server_info(self, timeout: float | None = None) -> ServerInfo:
        return convert.server_info(await self._call(self._stub.ServerInfo,
                                                    server_info_pb2.ServerInfoRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        resp = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service),
                                timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncStream:
    """Async iterator over a GenerateStream call; `cancel()` (or `async with`) to leave early."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._it: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._it is None:
            self._it = self._call.__aiter__()
        try:
            return convert.chunk(await self._it.__anext__())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()
