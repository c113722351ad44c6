"""Reading an adapter directory safely: JSON config, safetensors only, finite tensors, and the
same files on every reload as at registration."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from peftserve.adapters.errors import AdapterChanged, InvalidAdapter

# Pickled weights, refused by name (and uploads by their bytes, grpc/adapter_files.py): loading
# one runs code. clients/convert.py keeps the same list (the client imports nothing of the server).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Registrations' hashes, beside their parsing (SourceDir); a forked child gets a pool of its own
# (the parent's threads are not in it)
_HASHERS: ThreadPoolExecutor


def _new_hashers() -> None:
    global _HASHERS
    _HASHERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-hash")


_new_hashers()
os.register_at_fork(after_in_child=_new_hashers)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileDigest:
    """What registration saw of one file: where it led (symlinks followed) and its bytes' hash."""

    resolved: str
    sha256: str


class SourceDir:
    """An adapter directory whose files are each read once, as bytes: they are hashed as they
    are read, and parsed from those same bytes. `digests()` gives the hashes, which
    registration keeps. Given them back (`expected`), a reload refuses a file that now leads
    elsewhere (a symlink swapped in, maybe out of the adapter root) before reading it, and a
    file whose bytes changed, with AdapterChanged, before parsing it. At registration the hash
    runs on a thread of its own while the bytes are parsed (hashlib lets go of the GIL): an
    all-linear LoRA's 17 MB take ~12 ms to hash, a third of its registration."""

    def __init__(self, path: Path, expected: Mapping[str, FileDigest] | None = None) -> None:
        self.path = path
        self.expected = expected
        self._read: dict[str, tuple[str, Future[str]]] = {}

    def digests(self) -> dict[str, FileDigest]:
        """What was read, file by file (waits for the hashes still running)."""
        return {name: FileDigest(resolved, digest.result())
                for name, (resolved, digest) in self._read.items()}  # fmt: skip

    def file_bytes(self, name: str) -> bytes:
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(name)
        resolved = str(path.resolve(strict=True))
        want = self.expected.get(name) if self.expected is not None else None
        if self.expected is not None and (want is None or want.resolved != resolved):
            raise AdapterChanged(f"{name} now leads to another file than at registration "
                                 "(a link changed); re-register the adapter")
        with open(resolved, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidAdapter(f"{name} is not a regular file")
            data = f.read()
        digest = _HASHERS.submit(_sha256, data)  # at registration, beside the parsing
        if want is not None and want.sha256 != digest.result():  # a reload: before parsing
            raise AdapterChanged(f"{name} changed on disk since the adapter was registered; "
                                 "re-register it to serve the new weights")
        self._read[name] = (resolved, digest)
        return data

    def json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads(self.file_bytes(name))
        except FileNotFoundError:
            raise InvalidAdapter(f"{name} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidAdapter(f"{name} is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidAdapter(f"{name} is nested too deeply to be an adapter config") from None
        if not isinstance(data, dict):
            raise InvalidAdapter(f"{name} must hold a JSON object")
        return data

    def safetensors(self, name: str) -> dict[str, torch.Tensor]:
        """Loads `name`; refuses pickle checkpoints (they can run code when loaded) and
        tensors that are not floating point or not finite."""
        try:
            data = self.file_bytes(name)
        except FileNotFoundError:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise InvalidAdapter(
                    f"found pickle weights ({', '.join(pickles)[:200]}); peftserve loads "
                    f"safetensors only — re-save with safe_serialization=True"
                ) from None
            raise InvalidAdapter(f"{name} is missing") from None
        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as e:
            raise InvalidAdapter(f"{name} is not a readable safetensors file: {e}") from None
        for key, t in tensors.items():
            if not t.is_floating_point():
                raise InvalidAdapter(f"tensor {key[:128]} has dtype {t.dtype}; expected floating "
                                     "point")
        if not _sums_finite(tensors):  # then tensor by tensor, to name the first bad one
            for key, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise InvalidAdapter(f"tensor {key[:128]} contains NaN or Inf")
        return tensors


def _sums_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when every tensor is finite, known from one fp32 sum each, stacked: a NaN or an
    infinity makes its tensor's sum NaN or infinite, in any order of addition (an all-linear
    LoRA has hundreds of tensors: ~3 ms instead of ~18 ms for an isfinite each, of a ~50 ms
    registration). False: some value is not finite, or finite values' sum overflows fp32 (or
    a float64 value is beyond fp32): the caller looks tensor by tensor."""
    sums = [t.sum(dtype=torch.float32) for t in tensors.values()]
    return not sums or bool(torch.stack(sums).isfinite().all())


def expect_keys(config: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InvalidAdapter(f"unknown {what} fields: {', '.join(unknown)}")
