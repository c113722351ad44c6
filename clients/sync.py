"""Blocking client.

    with Client("127.0.0.1:50051") as c:
        print(c.generate("Hello", sampling=Sampling(max_new_tokens=16)).text)
        for chunk in c.generate_stream(messages=[{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from peftserve.client import convert
from peftserve.client.channel import DEFAULT_TARGET, ChannelConfig
from peftserve.client.errors import from_rpc_error
from peftserve.client.types import AdapterInfo, Chunk, Completion, Sampling, ServerInfo
from peftserve.v1 import adapters_pb2, server_info_pb2, service_pb2_grpc


class Client:
    def __init__(self, target: str = DEFAULT_TARGET, *, tls: bool = False,
                 tls_ca: str | Path | None = None, admin_token: str | None = None,
                 timeout: float | None = None) -> None:
        """`timeout`: default seconds per call (None = no deadline)."""
        self.config = ChannelConfig(target, tls, Path(tls_ca) if tls_ca else None, admin_token)
        self.timeout = timeout
        creds = self.config.credentials()
        self._channel = (grpc.secure_channel(target, creds, self.config.options) if creds
                         else grpc.insecure_channel(target, self.config.options))
        self._stub = service_pb2_grpc.PeftServeStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None,
              metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *,
                 messages: Sequence[Mapping[str, str]] | None = None,
                 token_ids: Sequence[int] | None = None, adapter: str | None = None,
                 sampling: Sampling | None = None, request_id: str | None = None,
                 timeout: float | None = None) -> Completion:
        """Exactly one of prompt (plain text), messages (chat turns; the server applies the
        model's chat template) or token_ids. `adapter`: a registered name; None = base."""
        req = convert.generate_request(prompt, messages, token_ids, adapter, sampling, request_id)
        return convert.completion(self._call(self._stub.Generate, req, timeout))

    def generate_stream(self, prompt: str | None = None, *,
                        messages: Sequence[Mapping[str, str]] | None = None,
                        token_ids: Sequence[int] | None = None, adapter: str | None = None,
                        sampling: Sampling | None = None, request_id: str | None = None,
                        timeout: float | None = None) -> Stream:
        """Like `generate`, chunk by chunk. Leaving early: `stream.cancel()` (or use it as a
        context manager); the server frees the request at once."""
        req = convert.generate_request(prompt, messages, token_ids, adapter, sampling, request_id)
        return Stream(self._stub.GenerateStream(req, timeout=timeout or self.timeout))

    # --- adapters ---------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | None = None, *,
                         directory: str | Path | None = None,
                         files: Mapping[str, bytes] | None = None, replace: bool = False,
                         timeout: float | None = None) -> AdapterInfo:
        """One of: `path` on the server (under its adapter root); a local `directory` whose
        .json/.safetensors files are uploaded; or `files` (name -> bytes). Admin call."""
        req = convert.register_request(name, path, directory, files, replace)
        resp = self._call(self._stub.RegisterAdapter, req, timeout, self.config.admin_metadata())
        return convert.adapter(resp.adapter)

    def unregister_adapter(self, name: str, timeout: float | None = None) -> None:
        self._call(self._stub.UnregisterAdapter, adapters_pb2.UnregisterAdapterRequest(name=name),
                   timeout, self.config.admin_metadata())

    def list_adapters(self, timeout: float | None = None) -> list[AdapterInfo]:
        resp = self._call(self._stub.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout)
        return [convert.adapter(a) for a in resp.adapters]

    def get_adapter(self, name: str, timeout: float | None = None) -> AdapterInfo:
        return convert.adapter(self._call(self._stub.GetAdapter,
                                          adapters_pb2.GetAdapterRequest(name=name), timeout))

    # --- the server -------------------------------------------------------------------------

    def server_info(self, timeout: float | None = None) -> ServerInfo:
        return convert.server_info(self._call(self._stub.ServerInfo,
                                              server_info_pb2.ServerInfoRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        resp = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class Stream:
    """Iterator over a GenerateStream call's chunks; failures raise typed `ApiError`s."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            return convert.chunk(next(self._call))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
