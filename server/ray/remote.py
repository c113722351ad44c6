"""Calls across Ray: a remote error comes back as the typed error that was raised, so that
`grpc.errors` maps it to its status code (and its message carries no remote traceback); Ray
Serve's own refusals become peftserve's."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
)

from peftserve.errors import EngineStopped, Overloaded

T = TypeVar("T")
RAY_ERRORS = (RayError, RayServeException)  # what a remote call raises besides user errors


def cause(error: BaseException) -> BaseException:
    """The exception user code raised, under Ray's wrappers."""
    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    if isinstance(error, BackPressureError):
        return Overloaded("every engine replica's queue is full")
    if isinstance(error, DeploymentUnavailableError):
        return EngineStopped("no engine replica is available")
    return error


async def call(awaitable: Awaitable[T]) -> T:
    """Awaits a remote call (an ObjectRef or a DeploymentResponse), raising what it raised."""
    try:
        return await awaitable
    except RAY_ERRORS as e:
        raise cause(e) from None
