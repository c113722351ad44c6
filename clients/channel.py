"""Connection options shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# Inline adapter uploads can be large; the server enforces its own cap.
_OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20))


@dataclass(frozen=True)
class ChannelConfig:
    target: str = DEFAULT_TARGET
    tls: bool = False  # True: TLS with the system roots, or `tls_ca` when given
    tls_ca: Path | None = None  # PEM file of the CA (or self-signed cert) to trust; implies tls
    admin_token: str | None = None  # sent as "authorization: Bearer ..." on admin calls

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.tls_ca):
            return None
        roots = Path(self.tls_ca).read_bytes() if self.tls_ca else None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    @property
    def options(self) -> tuple[tuple[str, int], ...]:
        return _OPTIONS
