"""Calls across Ray: a remote error comes back as the typed error that was raised, so that
`grpc.errors` maps it to its status code (and its message carries no remote traceback)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from ray.exceptions import RayTaskError

T = TypeVar("T")


def cause(error: BaseException) -> BaseException:
    """The exception user code raised, under Ray's wrappers."""
    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    return error


async def call(awaitable: Awaitable[T]) -> T:
    """Awaits a remote call (an ObjectRef or a DeploymentResponse), raising what it raised."""
    try:
        return await awaitable
    except RayTaskError as e:
        raise cause(e) from None
