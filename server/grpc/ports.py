"""Before anything starts: are the ports `peftserve serve` will bind free? A port in use is
one line and exit 1, before the model loads and before anything is created on disk."""

from __future__ import annotations

import socket

from peftserve.serve_config import ServeConfig


class PortInUse(Exception):
    """A port the server was told to bind cannot be bound."""


def check_free(config: ServeConfig) -> None:
    """Raises PortInUse naming the first port that cannot be bound (port 0 always can)."""
    wanted = [("gRPC", config.host, config.port)]
    if config.metrics_port is not None:
        wanted.append(("metrics", config.metrics_host, config.metrics_port))
    http_port = getattr(config, "http_port", None)
    if http_port is not None:
        wanted.append(("HTTP", config.host, http_port))
    for what, host, port in wanted:
        if port:
            _try_bind(what, host, port)


def _try_bind(what: str, host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as e:
        raise PortInUse(f"the {what} address {host}:{port} does not resolve: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the servers bind: a port in TIME_WAIT after a restart is free to them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise PortInUse(f"the {what} port {host}:{port} cannot be bound: "
                            f"{e.strerror or e}") from None
