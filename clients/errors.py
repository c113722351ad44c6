"""Typed client exceptions, one per gRPC status code the server answers with."""

from __future__ import annotations

import grpc


class ApiError(Exception):
    """A call failed. `code` is the gRPC status, `details` the server's message, `request_id`
    the id the server logged the call under (quote it when reporting a problem)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, request_id: str | None = None,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.request_id = request_id
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        quoted = self.request_id and self.request_id in self.details  # INTERNAL quotes it
        rid = f" (request id {self.request_id})" if self.request_id and not quoted else ""
        return f"{self.code.name}: {self.details}{rid}"


class InvalidArgumentError(ApiError):
    """The request (or an adapter's files) is wrong; the message says why."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ApiError):
    """No adapter of that name is registered."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ApiError):
    """An adapter of that name is registered; register with replace=True to swap it."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ApiError):
    """The adapter cannot be changed now (requests are using it)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ApiError):
    """The server's queue is full (or the message too large); retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ApiError):
    """The call's timeout passed; the server stopped the request."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(ApiError):
    """An admin call without the admin token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ApiError):
    """An admin call with the wrong admin token."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(ApiError):
    """The server is not reachable, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class CancelledError(ApiError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class InternalError(ApiError):
    """The server failed unexpectedly; it logged the details under the request id."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    cls.code: cls for cls in (
        InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError,
        ResourceExhaustedError, DeadlineExceededError, UnauthenticatedError,
        PermissionDeniedError, UnavailableError, CancelledError, InternalError)
}


def from_rpc_error(error: grpc.RpcError) -> ApiError:
    """The typed exception for a failed call (sync or asyncio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    request_id = None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "x-request-id":
            request_id = str(value)
    cls = _BY_CODE.get(code, ApiError)
    return cls(details, request_id, code=code)
