"""Around every peftserve RPC: a request id, the admin-token check, and error -> status.

The request id comes from `x-request-id` metadata (or is made up) and goes back in the trailing
metadata, also on errors, so a client can quote it. Admin RPCs need `authorization: Bearer
<token>` when the server has a token: none is UNAUTHENTICATED, a wrong one PERMISSION_DENIED.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from peftserve.errors import InvalidRequest
from peftserve.grpc.errors import PermissionDenied, Unauthenticated, to_status

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/peftserve.v1.PeftServe/"
KSERVE_PREFIX = "/inference.GRPCInferenceService/"  # KServe v2, on the same port
ADMIN_METHODS = frozenset({SERVICE_PREFIX + "RegisterAdapter",
                           SERVICE_PREFIX + "UnregisterAdapter"})
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

REQUEST_ID: ContextVar[str] = ContextVar("peftserve_request_id", default="-")


def current_request_id() -> str:
    return REQUEST_ID.get()


class ApiInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, admin_token: str | None) -> None:
        self._token = admin_token.encode() if admin_token else None
        self._log_malformed = _RateLimitedLog()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith((SERVICE_PREFIX, KSERVE_PREFIX)):
            return handler  # health, reflection, unknown methods: grpc's own handling
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        rid = metadata.get(REQUEST_ID_KEY, "")
        if not _REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        denied = self._check_admin(metadata) if details.method in ADMIN_METHODS else None
        return _wrap(handler, rid, denied, details.method, self._log_malformed)

    def _check_admin(self, metadata: dict[str, str]) -> Exception | None:
        if self._token is None:
            return None
        auth = metadata.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return Unauthenticated("this RPC needs 'authorization: Bearer <admin token>' metadata")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return PermissionDenied("the admin token is wrong")
        return None


class _Malformed:
    """Stands in for a request message that did not parse (random bytes, truncated, a string
    field that is not UTF-8): the handler answers INVALID_ARGUMENT, after the token check."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _RateLimitedLog:
    """One WARNING line per `every_s` seconds, however many malformed messages arrive: an
    unauthenticated client must not be able to flood the log."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, method: str, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        log.warning("malformed %s request (%s: %s); %d more since the last such line",
                    method.rsplit("/", 1)[-1], type(error).__name__, str(error)[:200],
                    self._suppressed)
        self._last, self._suppressed = now, 0


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, and whatever a truncated message raises
            return _Malformed(e)

    return parse


def _check_parsed(request: Any, method: str, log_malformed: _RateLimitedLog) -> None:
    if isinstance(request, _Malformed):
        log_malformed(method, request.error)
        raise InvalidRequest(f"the request is not a valid {method.rsplit('/', 1)[-1]} message: "
                             f"{str(request.error)[:200]}")


def _wrap(handler: grpc.RpcMethodHandler, rid: str, denied: Exception | None, method: str,
          log_malformed: _RateLimitedLog) -> grpc.RpcMethodHandler:
    trailer = ((REQUEST_ID_KEY, rid),)

    async def fail(context: grpc.aio.ServicerContext, error: Exception) -> None:
        code, message = to_status(error, rid)
        await context.abort(code, message, trailing_metadata=trailer)

    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            REQUEST_ID.set(rid)
            context.set_trailing_metadata(trailer)
            try:
                if denied is not None:
                    raise denied
                _check_parsed(request, method, log_malformed)
                return await inner_unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await fail(context, e)

        return grpc.unary_unary_rpc_method_handler(
            unary, _safe(handler.request_deserializer), handler.response_serializer)

    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            REQUEST_ID.set(rid)
            context.set_trailing_metadata(trailer)
            try:
                if denied is not None:
                    raise denied
                _check_parsed(request, method, log_malformed)
                async for response in inner_stream(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await fail(context, e)

        return grpc.unary_stream_rpc_method_handler(
            stream, _safe(handler.request_deserializer), handler.response_serializer)

    raise TypeError(f"peftserve has no client-streaming RPCs, got a handler for {handler}")
