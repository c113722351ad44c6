"""Errors as the OpenAI API writes them: `{"error": {"message", "type", "param", "code"}}` with
the matching HTTP status.

Which typed error means what stays in one table (`peftserve.grpc.errors`, by gRPC status code,
unknown errors logged there with the request id and answered without detail); this module only
turns that code into HTTP's, as gRPC's own HTTP mapping does.
"""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from peftserve.adapters.errors import AdapterNotFound
from peftserve.grpc.errors import to_status

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error",
         503: "server_error", 504: "server_error"}


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE.get(status, "server_error"),
                      "param": param, "code": code}}


def status_of(error: BaseException, request_id: str) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body of a failed request."""
    code, message = to_status(error, request_id)
    status = HTTP_STATUS.get(code, 500)
    if isinstance(error, AdapterNotFound):
        return status, error_body(status, message, "model_not_found", "model")
    return status, error_body(status, message, code.name.lower())


def error_response(error: BaseException, request_id: str) -> JSONResponse:
    status, body = status_of(error, request_id)
    return JSONResponse(body, status_code=status, headers={"x-request-id": request_id})
