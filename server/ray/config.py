"""Typed configuration of the Ray Serve application: the `[ray]` table of the TOML file that
`peftserve serve --config` reads. Validated here, built once, passed down."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftserve.serve_config import ServeConfig


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: a local Ray instance; "auto" or host:port: a cluster
    app_name: str = "peftserve"
    replicas: int = 2  # engine replicas when not autoscaling
    min_replicas: int | None = None  # both bounds set: Ray Serve autoscales between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # autoscaling target, requests per replica
    cpus_per_replica: float = 1.0  # Ray resources an engine replica reserves
    gpus_per_replica: float = 0.0
    adapters_per_replica: int = 16  # Ray Serve's multiplexed LRU per replica
    max_ongoing_requests: int = 64  # per replica; the engine batches what it is given
    grpc_port: int = 9000  # Ray Serve's gRPC proxy listens on all interfaces
    http_port: int = 8000  # Ray Serve's HTTP proxy (unused by peftserve; bound to the host)
    # How long a request waits for a replica that holds its adapter (busy ones included) before
    # Ray Serve tries the replica with the fewest adapters (its multiplexed matching timeout;
    # Ray Serve draws it between this and twice this).
    affinity_wait_s: float = 0.5
    sync_interval_s: float = 0.5  # replica <-> shared registry: adapter versions and metrics
    registry_wait_s: float = 10.0  # an unregister waits this long for every replica to drop it

    def __post_init__(self) -> None:
        for name in ("replicas", "adapters_per_replica", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"ray.{name} must be >= 1, got {getattr(self, name)}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both ray.min_replicas and ray.max_replicas, or neither")
        if self.min_replicas is not None and self.max_replicas is not None:
            if not 1 <= self.min_replicas <= self.max_replicas:
                raise ValueError(f"need 1 <= ray.min_replicas <= ray.max_replicas, got "
                                 f"{self.min_replicas}, {self.max_replicas}")
        for name in ("grpc_port", "http_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ValueError(f"ray.{name} must be in [1, 65535], got {getattr(self, name)}")
        for name in ("cpus_per_replica", "gpus_per_replica"):
            if getattr(self, name) < 0:
                raise ValueError(f"ray.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("target_ongoing_requests", "sync_interval_s", "registry_wait_s",
                     "affinity_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ray.{name} must be > 0, got {getattr(self, name)}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


def from_mapping(values: dict[str, Any]) -> RayConfig:
    known = {f.name for f in dataclasses.fields(RayConfig)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"unknown [ray] keys: {', '.join(bad)}")
    return RayConfig(**values)


def read(toml_path: Path | None, overrides: dict[str, Any] | None = None) -> RayConfig:
    """The `[ray]` table of `toml_path` (absent: the defaults), then `overrides`."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        import tomllib  # Python 3.11+

        with toml_path.open("rb") as f:
            table = tomllib.load(f).get("ray", {})
        if not isinstance(table, dict):
            raise ValueError("[ray] in the config file must be a table")
        values.update(table)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(values)


def unsupported(config: ServeConfig) -> str | None:
    """Why `config` cannot be served on Ray Serve, or None."""
    if config.tls:
        return ("TLS is not supported with --ray: Ray Serve's gRPC proxy is plaintext "
                "(terminate TLS in front of it)")
    return None
