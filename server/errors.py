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
