"""Typed configuration of `peftserve serve`: CLI flags over an optional TOML file.

Built once at start-up and passed down. The admin token is read from `--admin-token-file` or the
PEFTSERVE_ADMIN_TOKEN environment variable here and nowhere else (a token on the command line
would show in `ps`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftserve.config import EngineConfig

ADMIN_TOKEN_ENV = "PEFTSERVE_ADMIN_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a decision
    port: int = 50051  # 0 = any free port (the bound port is logged)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9464  # Prometheus /metrics; None = no metrics endpoint
    http_port: int | None = None  # the OpenAI-compatible HTTP API on `host`; None = off
    adapter_root: Path | None = None  # RegisterAdapter by path only below this; None = refused
    staging_dir: Path | None = None  # inline adapter uploads; None = a private temp dir
    max_inline_adapter_bytes: int = 64 << 20  # total size of one inline upload
    max_concurrent_streams: int = 256  # Generate + GenerateStream calls in flight
    default_max_new_tokens: int = 128  # when a request does not say
    metrics_max_adapter_labels: int = 32  # adapters beyond this share the label "other"
    admin_token: str | None = field(default=None, repr=False)  # None = admin RPCs open
    tls_cert: Path | None = None  # PEM; with tls_key, serve TLS only
    tls_key: Path | None = None
    grace_period_s: float = 30.0  # SIGTERM: time in-flight requests get to finish

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        for name in ("max_inline_adapter_bytes", "max_concurrent_streams",
                     "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.metrics_max_adapter_labels < 0:
            raise ValueError("metrics_max_adapter_labels must be >= 0")
        if self.default_max_new_tokens > self.engine.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens {self.default_max_new_tokens} exceeds "
                             f"max_new_tokens {self.engine.max_new_tokens_limit}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a file")
        if self.adapter_root is not None and not self.adapter_root.is_dir():
            raise ValueError(f"adapter_root {self.adapter_root} is not a directory")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin_token is empty")
        if not self.grace_period_s >= 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


# CLI flag / TOML key -> ServeConfig field; engine fields go to EngineConfig. TOML files use the
# same names (with underscores), at the top level or under [engine] for engine fields.
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_PATH_FIELDS = {"adapter_root", "staging_dir", "tls_cert", "tls_key"}


def build(values: Mapping[str, Any], toml_path: Path | None = None,
          environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Merges, lowest first: defaults, the TOML file, `values` (CLI flags; None = not given).
    Unknown keys are an error, so a typo in the file does not silently keep a default."""
    merged: dict[str, Any] = {}
    if toml_path is not None:
        merged.update(_read_toml(toml_path))
    merged.update({k: v for k, v in values.items() if v is not None})
    environ = os.environ if environ is None else environ
    token_file = merged.pop("admin_token_file", None)
    if token_file is not None:
        merged["admin_token"] = Path(token_file).read_text().strip()
    elif "admin_token" not in merged and environ.get(ADMIN_TOKEN_ENV):
        merged["admin_token"] = environ[ADMIN_TOKEN_ENV]
    serve_fields = {f.name for f in dataclasses.fields(ServeConfig)} - {"engine"}
    engine_kw, serve_kw = {}, {}
    for key, value in merged.items():
        if key in _ENGINE_FIELDS:
            engine_kw[key] = value
        elif key in serve_fields:
            serve_kw[key] = Path(value).expanduser() if key in _PATH_FIELDS else value
        else:
            raise ValueError(f"unknown configuration key {key!r}")
    if serve_kw.get("metrics_port") == -1:
        serve_kw["metrics_port"] = None
    return ServeConfig(engine=EngineConfig(**engine_kw), **serve_kw)


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # Python 3.11+

    with path.open("rb") as f:
        data = tomllib.load(f)
    data.pop("ray", None)  # `peftserve serve --ray` reads it (peftserve.ray.config)
    engine = data.pop("engine", {})
    if not isinstance(engine, dict):
        raise ValueError("[engine] in the config file must be a table")
    bad = sorted(set(engine) - _ENGINE_FIELDS)
    if bad:
        raise ValueError(f"unknown [engine] keys in {path}: {', '.join(bad)}")
    return {**data, **engine}
