"""server/adapters/files.py's hashes: taken on a thread while the bytes are parsed, they are the
sha256 of the bytes read, and a forked child hashes with a pool of its own."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from peftserve.adapters import files
from peftserve.adapters.errors import AdapterChanged


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
