"""Python client for the peftserve gRPC API (sync and asyncio; no torch import)."""

from peftserve.client.aio import AsyncClient, AsyncStream
from peftserve.client.errors import (
                                     AlreadyExistsError,
                                     ApiError,
                                     CancelledError,
                                     DeadlineExceededError,
                                     FailedPreconditionError,
                                     InternalError,
                                     InvalidArgumentError,
                                     NotFoundError,
                                     PermissionDeniedError,
                                     ResourceExhaustedError,
                                     UnauthenticatedError,
                                     UnavailableError,
)
from peftserve.client.sync import Client, Stream
from peftserve.client.types import (
                                     AdapterInfo,
                                     Chunk,
                                     Completion,
                                     Limits,
                                     Load,
                                     Sampling,
                                     ServerInfo,
                                     Timings,
)

__all__ = [
    "AdapterInfo", "AlreadyExistsError", "ApiError", "AsyncClient", "AsyncStream",
    "CancelledError", "Chunk", "Client", "Completion", "DeadlineExceededError",
    "FailedPreconditionError", "InternalError", "InvalidArgumentError", "Limits", "Load",
    "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError", "Sampling", "ServerInfo",
    "Stream", "Timings", "UnauthenticatedError", "UnavailableError",
]
