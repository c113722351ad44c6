"""server/adapters/files.py's hashes: taken on a thread while the bytes are parsed, and waited
for by nobody at registration, they are the sha256 of the bytes read, and a forked child hashes
with a pool of its own."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from peftserve.adapters import files
from peftserve.adapters.errors import AdapterChanged
from peftserve.adapters.loader import AdapterLimits, load_adapter
from peftserve.models.llama import ModelShape
from tests import adapters as A


@pytest.fixture
def adapter_dir(tmp_path):
    save_file({"a": torch.randn(64, 64), "b": torch.randn(7)}, tmp_path / "w.safetensors")
    (tmp_path / "c.json").write_text('{"r": 4}')
    return tmp_path


def test_digests_are_the_sha256_of_the_bytes_read(adapter_dir):
    source = files.SourceDir(adapter_dir)
    source.safetensors("w.safetensors")
    source.json("c.json")
    digests = source.digests()
    for name in ("w.safetensors", "c.json"):
        want = hashlib.sha256((adapter_dir / name).read_bytes()).hexdigest()
        assert digests[name].sha256 == want
        assert digests[name].resolved == str((adapter_dir / name).resolve())
    # a reload with them reads the same files; changed bytes are refused before parsing
    files.SourceDir(adapter_dir, digests).safetensors("w.safetensors")
    save_file({"a": torch.zeros(64, 64), "b": torch.randn(7)}, adapter_dir / "w.safetensors")
    with pytest.raises(AdapterChanged, match="changed on disk"):
        files.SourceDir(adapter_dir, digests).safetensors("w.safetensors")


def test_a_forked_child_hashes_with_its_own_pool(adapter_dir):
    parent = files.SourceDir(adapter_dir)
    parent.file_bytes("w.safetensors")  # the parent's pool has threads now
    want = parent.digests()["w.safetensors"].sha256
    pid = os.fork()
    if pid == 0:  # the child: its digest, or exit 1
        try:
            child = files.SourceDir(adapter_dir)
            child.file_bytes("w.safetensors")
            os._exit(0 if child.digests()["w.safetensors"].sha256 == want else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's hash never finished (the parent's pool has no threads there)")


class Unhashed(Future):
    """A hash not yet taken: waiting for it is an error (nothing is to wait at registration)."""

    def result(self, timeout=None):
        assert self.done(), "waited for a hash at registration"
        return super().result(timeout)


class Held:
    """An executor whose tasks run only when released."""

    def __init__(self):
        self.held: list[tuple[Future, object, tuple]] = []

    def submit(self, fn, *args) -> Future:
        future = Unhashed()
        self.held.append((future, fn, args))
        return future

    def release(self):
        for future, fn, args in self.held:
            future.set_result(fn(*args))


def test_registration_does_not_wait_for_the_hash(tiny_llama_dir, tmp_path, monkeypatch):
    lora_dir = A.make_lora(tiny_llama_dir, tmp_path / "a", r=4)
    held = Held()
    monkeypatch.setattr(files, "_HASHERS", held)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    loaded = load_adapter(lora_dir, shape, AdapterLimits())  # read, parsed, checked
    assert loaded.lora.modules and not any(d.hashing.done() for d in loaded.files.values())
    held.release()
    for name, digest in loaded.files.items():
        assert digest.sha256 == hashlib.sha256((lora_dir / name).read_bytes()).hexdigest()
