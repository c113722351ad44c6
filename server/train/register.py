"""`--register HOST:PORT`: upload the trained adapter to a running server (replacing an adapter
of the same name, a hot reload) through the gRPC client, imported only when asked for."""

from __future__ import annotations

from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RegisterError(RuntimeError):
    """The trained adapter could not be registered with the server; the message says why."""


def register(target: str, name: str, directory: Path, admin_token: str | None = None,
             timeout_s: float = 120.0) -> str:
    """Registers `directory`'s adapter files inline under `name`; returns a one-line summary."""
    try:
        from peftserve.client import ApiError, Client
    except ImportError as e:
        raise RegisterError(f"--register needs the peftserve gRPC client (peftserve.client), "
                            f"which failed to import: {e}") from e
    files = {f: (directory / f).read_bytes() for f in ADAPTER_FILES}
    try:
        with Client(target, admin_token=admin_token, timeout=timeout_s) as client:
            info = client.register_adapter(name, files=files, replace=True)
    except ApiError as e:
        raise RegisterError(f"registering {name!r} with {target} failed: {e}") from e
    return (f"registered {info.name!r} with {target}: {info.kind}, {info.num_params} "
            f"parameters, residency {info.residency}")
