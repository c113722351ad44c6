"""Adapter errors, each mapped to one gRPC status code in `grpc/`."""

from peftserve.errors import InvalidRequest, PeftServeError


class AdapterNotFound(PeftServeError, KeyError):
    """No adapter of that name is registered (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExists(PeftServeError):
    """An adapter of that name is registered and `replace` was not asked (ALREADY_EXISTS)."""


class InvalidAdapter(InvalidRequest):
    """The adapter's files are unusable: the message names the problem (INVALID_ARGUMENT)."""


class AdapterChanged(PeftServeError):
    """A reload found the adapter's files changed (or leading elsewhere) since registration: its
    requests fail until it is registered again (FAILED_PRECONDITION)."""
