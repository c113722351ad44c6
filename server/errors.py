"""Typed errors raised below the gRPC layer; `grpc/` maps each to one status code."""


class PeftServeError(Exception):
    """Base class of every error peftserve raises on purpose."""


class InvalidRequest(PeftServeError, ValueError):
    """The request itself is wrong (empty prompt, bad sampling parameters, too long)."""


class UnsupportedModel(PeftServeError, ValueError):
    """The base model's architecture or files are not something peftserve can serve."""


class Overloaded(PeftServeError):
    """The server cannot take more work right now (queue full)."""


class EngineStopped(PeftServeError):
    """The engine is shutting down and admits no new requests."""


def shorten(value: object, limit: int = 64) -> str:
    """`repr(value)` cut to about `limit` characters, for echoing client-supplied values in
    messages: a 20,000-character name must not come back whole (status messages travel in
    metadata, whose size clients bound)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"
