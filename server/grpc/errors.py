"""The one place where errors become gRPC status codes.

Typed errors carry a message meant for the client. Anything else is a bug: it is logged with
the request id and answered INTERNAL with no detail, never a stack trace.
"""

from __future__ import annotations

import logging

import grpc

from peftserve.adapters.errors import (
    AdapterChanged,
    AdapterExists,
    AdapterNotFound,
)
from peftserve.errors import EngineStopped, InvalidRequest, Overloaded, PeftServeError
from peftserve.gateway import RequestFailed

log = logging.getLogger(__name__)


class Unauthenticated(PeftServeError):
    """An admin RPC came without a bearer token."""


class PermissionDenied(PeftServeError):
    """An admin RPC came with the wrong bearer token."""


class RegistrationDisabled(PeftServeError):
    """RegisterAdapter by path on a server started without an adapter root."""


# Most specific first: InvalidAdapter is an InvalidRequest.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterChanged, grpc.StatusCode.FAILED_PRECONDITION),
    (RegistrationDisabled, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (RequestFailed, grpc.StatusCode.FAILED_PRECONDITION),
)

INTERNAL_MESSAGE = "internal error (request id {rid}); the server logged the details"


def code_of(error: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Status messages travel in trailing metadata, which clients bound (8-16 KB): a message that
# echoes a long client value is cut here, whatever raised it.
MAX_MESSAGE_CHARS = 1024


def to_status(error: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(error, kind):
            message = str(error)
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[:MAX_MESSAGE_CHARS] + "... (cut short)"
            return code, message
    log.error("request %s failed unexpectedly", request_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(rid=request_id)


def outcome(code: grpc.StatusCode) -> str:
    """The `outcome` metric label of a failed request: the status code's name, lower case."""
    return code.name.lower()
