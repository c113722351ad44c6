"""Log records gRPC's own asyncio server writes that are not server errors.

When a client leaves (it cancelled, or its deadline passed) just as a unary response is being
sent, grpc's Cython server fails the send and logs `ExecuteBatchError raised in core by
servicer method [...]` at ERROR with its own traceback. Nothing failed on the server's side and
the client no longer waits: the record is kept as one WARNING line, without the traceback.
"""

from __future__ import annotations

import logging

GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_SEND_FAILED = "ExecuteBatchError raised in core by servicer method"


class ClientGoneFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(_SEND_FAILED):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"{record.getMessage()}: the response was not sent (client gone)"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def install() -> None:
    """Idempotent: adds the filter to gRPC's core logger once."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, ClientGoneFilter) for f in logger.filters):
        logger.addFilter(ClientGoneFilter())
