"""Reading an adapter directory safely: JSON config, safetensors only, finite tensors, and the
same files on every reload as at registration."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftserve.adapters.errors import AdapterChanged, InvalidAdapter
from peftserve.errors import shorten

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


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileDigest:
    """What registration saw of one file: where it led (symlinks followed) and its bytes' hash,
    still being taken on a thread of its own when registration returns (a reload is the first
    to need it)."""

    resolved: str
    hashing: Future[str]

    @property
    def sha256(self) -> str:
        return self.hashing.result()


class SourceDir:
    """An adapter directory whose files are each read once: they are hashed as they are read,
    and parsed from those same bytes. `digests()` gives the hashes, which registration keeps.
    Given them back (`expected`), a reload refuses a file that now leads elsewhere (a symlink
    swapped in, maybe out of the adapter root) before reading it, and a file whose bytes
    changed, with AdapterChanged, before parsing it. At registration the hash runs on a thread
    of its own (hashlib lets go of the GIL) and nothing waits for it: an all-linear LoRA's 17 MB
    take ~13 ms to hash, more than the rest of its registration."""

    def __init__(self, path: Path, expected: Mapping[str, FileDigest] | None = None) -> None:
        self.path = path
        self.expected = expected
        self._read: dict[str, FileDigest] = {}

    def digests(self) -> dict[str, FileDigest]:
        """What was read, file by file; each hash may still be running."""
        return dict(self._read)

    def file_bytes(self, name: str) -> bytes:
        return self._file(name).numpy().tobytes()

    def _file(self, name: str) -> torch.Tensor:
        """The file's bytes as a uint8 tensor (its tensors are views of them: no copy)."""
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(name)
        resolved = str(path.resolve(strict=True))
        want = self.expected.get(name) if self.expected is not None else None
        if self.expected is not None and (want is None or want.resolved != resolved):
            raise AdapterChanged(
                f"{name} now leads to another file than at registration "
                "(a link changed); re-register the adapter"
            )
        with open(resolved, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InvalidAdapter(f"{name} is not a regular file")
            data = torch.empty(st.st_size, dtype=torch.uint8)
            view, got = memoryview(data.numpy()), 0
            while got < st.st_size and (step := f.readinto(view[got:])):
                got += step
        data = data[:got]  # a file cut short while read: its bytes are what is hashed and parsed
        digest = _HASHERS.submit(_sha256, data.numpy())
        if want is not None and want.sha256 != digest.result():  # a reload: before parsing
            raise AdapterChanged(
                f"{name} changed on disk since the adapter was registered; "
                "re-register it to serve the new weights"
            )
        self._read[name] = FileDigest(resolved, digest)
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
            data = self._file(name)
        except FileNotFoundError:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise InvalidAdapter(
                    f"found pickle weights ({', '.join(pickles)[:200]}); peftserve loads "
                    f"safetensors only — re-save with safe_serialization=True"
                ) from None
            raise InvalidAdapter(f"{name} is missing") from None
        tensors, runs = read_safetensors(data, name)
        if not _sums_finite(runs):  # then tensor by tensor, to name the first bad one
            for key, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise InvalidAdapter(f"tensor {key[:128]} contains NaN or Inf")
        return tensors


# safetensors' names of the dtypes an adapter's weights may have
SAFETENSORS_FLOATS = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_MAX_HEADER = 100_000_000  # bytes, safetensors' own bound


def read_safetensors(
    data: torch.Tensor, name: str = "the weights"
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The tensors of a safetensors file held in `data` (uint8), as views of it, in the order
    of their offsets; and the data section as runs of one dtype each (a view per run), to check
    it in a few ops. The header is held to the rules of the safetensors library's own reader (a
    length within the file and at most 100 MB, a UTF-8 JSON object, each tensor's dtype, shape
    and offsets, the offsets tiling the data section exactly, with no gap or overlap, to the
    end of the file), and dtypes to floating point ones: InvalidAdapter otherwise. The
    library's reader copies every tensor out of the bytes (its Python API has no other way from
    bytes); a view copies nothing, except a run whose offset is not a multiple of its item size
    (no writer of the format makes one), which is copied out to align it.
    tests/unit/test_safetensors_views.py holds this to the library, on valid files and on
    thousands of damaged ones."""

    def bad(why: str) -> InvalidAdapter:
        return InvalidAdapter(f"{name} is not a readable safetensors file: {why}")

    size = data.numel()
    if size < 8:
        raise bad("shorter than its 8-byte header length")
    n = int.from_bytes(data[:8].numpy().tobytes(), "little")
    if n > _MAX_HEADER or 8 + n > size:
        raise bad(f"its header length ({n} bytes) runs past the file's {size} bytes or 100 MB")
    try:
        header = json.loads(data[8 : 8 + n].numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("its header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise bad("its __metadata__ is not a map of strings")
    entries = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {shorten(key)} is not described by an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise bad(f"tensor {shorten(key)} lacks a dtype, a shape or two data offsets")
        if dtype not in SAFETENSORS_FLOATS:
            raise InvalidAdapter(
                f"tensor {key[:128]} has dtype {shorten(dtype)}; expected "
                f"floating point ({', '.join(SAFETENSORS_FLOATS)})"
            )
        entries.append((offsets[0], offsets[1], key, SAFETENSORS_FLOATS[dtype], shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    base, at = 8 + n, 0
    runs: list[tuple[int, torch.dtype, list]] = []  # (begin, dtype, entries): one dtype each
    for entry in entries:
        begin, end, key, dtype, shape = entry
        if begin != at or end < begin:
            raise bad(f"tensor {shorten(key)}'s data offsets leave a gap or overlap another's")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise bad(f"tensor {shorten(key)}'s offsets do not hold its shape and dtype")
        at = end
        if runs and runs[-1][1] is dtype:
            runs[-1][2].append(entry)
        else:
            runs.append((begin, dtype, [entry]))
    if base + at != size:
        raise bad(f"its tensors end at byte {base + at}, the file at {size}")
    tensors, views = {}, []
    for begin, dtype, run in runs:
        raw = data[base + begin : base + run[-1][1]]
        if (base + begin) % dtype.itemsize:
            raw = raw.clone()  # to align it
        views.append(raw.view(dtype))
        sizes = [(e - b) // dtype.itemsize for b, e, *_ in run]
        for (_, _, key, _, shape), t in zip(run, views[-1].split_with_sizes(sizes), strict=True):
            tensors[key] = t.view(shape)
    return tensors, views


def _sums_finite(runs: list[torch.Tensor]) -> bool:
    """True when every value is finite, known from one fp32 sum of each run of one dtype
    (mostly the whole data section): a NaN or an infinity makes the sum NaN or infinite, in
    any order of addition (an all-linear LoRA's 420 tensors: one op instead of one each, or
    ~18 ms of isfinite). False: some value is not finite, or finite values' sum overflows
    fp32 (or a float64 value is beyond fp32): the caller looks tensor by tensor."""
    sums = [run.sum(dtype=torch.float32) for run in runs]
    return not sums or bool(torch.stack(sums).isfinite().all())


def expect_keys(config: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InvalidAdapter(f"unknown {what} fields: {', '.join(unknown)}")
