"""Where RegisterAdapter may read adapter files from.

By path: only directories that resolve (symlinks followed) under the configured adapter root,
and whose files do too. Inline: the uploaded files are checked (names, size, safetensors, never
a pickle) and written to a staging directory the server owns; a staged copy is deleted when its
adapter is unregistered or replaced, or when registration fails.
"""

from __future__ import annotations

import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import PICKLE_SUFFIXES
from peftserve.errors import shorten
from peftserve.grpc.errors import RegistrationDisabled

ALLOWED_SUFFIXES = (".json", ".safetensors")
CONFIG_FILE = "adapter_config.json"
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class AdapterFiles:
    def __init__(self, root: Path | None, staging_dir: Path | None, max_inline_bytes: int) -> None:
        self.root = root.resolve() if root is not None else None
        self._own_staging = staging_dir is None
        self._staging = staging_dir  # a private temp dir is made on the first upload
        self.max_inline_bytes = max_inline_bytes
        self._staged: dict[str, Path] = {}  # adapter name -> its staged directory

    @property
    def staging(self) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="peftserve-staging-"))
        self._staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._staging

    # --- by path ----------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """The directory `path` names under the adapter root (relative to it, or absolute)."""
        if self.root is None:
            raise RegistrationDisabled("registering by path is disabled: the server has no "
                                       "adapter root (--adapter-root); send the files inline")
        if not path:
            raise InvalidAdapter("path is empty")
        if "\x00" in path:
            raise InvalidAdapter("path contains a NUL byte")
        try:
            return self._resolve(path)
        except (OSError, RuntimeError) as e:  # ENAMETOOLONG, ELOOP ("Symlink loop"), EACCES
            reason = getattr(e, "strerror", None) or str(e)
            raise InvalidAdapter(f"path {shorten(path)} cannot be read: {reason}") from None

    def _resolve(self, path: str) -> Path:
        assert self.root is not None
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root) or target == self.root:
            raise InvalidAdapter(f"path {shorten(path)} is outside the adapter root")
        if not target.is_dir():
            raise InvalidAdapter(f"path {shorten(path)} is not a directory under the adapter root")
        for entry in target.iterdir():
            if not entry.resolve().is_relative_to(self.root):
                raise InvalidAdapter(f"{shorten(entry.name)} in {shorten(path)} links outside the "
                                     "adapter root")
        return target

    # --- inline -----------------------------------------------------------------------------

    def stage(self, files: Mapping[str, bytes]) -> Path:
        """Checks the uploaded files and writes them to a fresh staging directory."""
        if CONFIG_FILE not in files:
            raise InvalidAdapter(f"inline adapter has no {CONFIG_FILE}")
        total = sum(len(data) for data in files.values())
        if total > self.max_inline_bytes:
            raise InvalidAdapter(f"inline adapter is {total} bytes; the limit is "
                                 f"{self.max_inline_bytes}")
        for name, data in files.items():
            _check_file(name, data)
        directory = self.staging / uuid.uuid4().hex
        directory.mkdir(mode=0o700)
        for name, data in files.items():
            (directory / name).write_bytes(data)
        return directory

    def keep(self, name: str, directory: Path) -> None:
        """`directory` now backs adapter `name`; the copy it replaces is deleted."""
        old = self._staged.pop(name, None)
        self._staged[name] = directory
        if old is not None and old != directory:
            discard(old)

    def release(self, name: str) -> None:
        """Adapter `name` is gone: delete its staged copy, if it had one."""
        old = self._staged.pop(name, None)
        if old is not None:
            discard(old)

    def close(self) -> None:
        for directory in self._staged.values():
            discard(directory)
        self._staged.clear()
        if self._own_staging and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _check_file(name: str, data: bytes) -> None:
    if not _FILE_NAME_RE.match(name) or ".." in name:
        raise InvalidAdapter(f"inline file name {shorten(name)} must be a plain file name")
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES) or _looks_like_pickle(data):
        raise InvalidAdapter(f"{name} is a pickle checkpoint; peftserve loads safetensors only "
                             "(pickles can run code when loaded)")
    if not lower.endswith(ALLOWED_SUFFIXES):
        raise InvalidAdapter(f"inline file {shorten(name)}: only .json and .safetensors files are "
                             "accepted")
    if lower.endswith(".safetensors") and not _looks_like_safetensors(data):
        raise InvalidAdapter(f"{name} is not a safetensors file")


def _looks_like_pickle(data: bytes) -> bool:
    # Pickle protocol 2+ opens with PROTO (0x80) and the version; torch.save writes a zip.
    return (len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5) or data[:4] == b"PK\x03\x04"


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON header.
    if len(data) < 10:
        return False
    (header,) = struct.unpack("<Q", data[:8])
    return 2 <= header <= len(data) - 8 and data[8:9] == b"{"
