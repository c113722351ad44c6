"""The `peftserve` command answers every bad input with one line and a non-zero exit: ports in
use, adapter directories the server would refuse or that link out, a closed pipe. No
traceback, and nothing left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftserve.client.errors import InternalError
from tests import adapters as A
from tests.e2e.conftest import TINY_SERVER_ARGS


def peftserve(*args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peftserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess[str], match: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and "never awaited" not in err, err
    assert len(err.splitlines()) == 1, err
    assert match in err, err


@pytest.fixture()
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_serve_with_a_port_in_use_says_so_and_leaves_nothing(tiny_llama_dir, tmp_path, busy_port,
                                                            flag):
    other = "--metrics-port" if flag == "--port" else "--port"
    proc = peftserve("serve", "--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, flag,
                     str(busy_port), other, "0", env={"TMPDIR": str(tmp_path)})
    one_line_error(proc, f"127.0.0.1:{busy_port} cannot be bound")
    assert proc.returncode == 1
    assert list(tmp_path.iterdir()) == []  # no staging directory behind


@pytest.fixture()
def adapter(tiny_llama_dir, tmp_path) -> Path:
    return A.make_lora(tiny_llama_dir, tmp_path / "lora", r=2)


def register_upload(directory: Path) -> subprocess.CompletedProcess[str]:
    # Nothing listens on port 1: each refusal happens before the client connects.
    return peftserve("adapters", "register", "x", "--upload", str(directory),
                     "--server", "127.0.0.1:1", "--timeout", "5")


def test_upload_refuses_a_link_out_of_the_directory(adapter, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    (adapter / "extra.json").symlink_to(secret)
    one_line_error(register_upload(adapter), "extra.json")


def test_upload_names_pickle_weights(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.rename(adapter / "adapter_model.bin")
    one_line_error(register_upload(adapter), "pickle weights (adapter_model.bin)")


def test_upload_of_an_empty_or_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(register_upload(tmp_path / "empty"), "holds no adapter_config.json")
    one_line_error(register_upload(tmp_path / "missing"), "is not a directory")


def test_a_missing_token_file_is_one_line(adapter, tmp_path):
    proc = peftserve("adapters", "register", "x", "--upload", str(adapter), "--server",
                     "127.0.0.1:1", "--admin-token-file", str(tmp_path / "nope"))
    one_line_error(proc, "No such file or directory")


def test_an_error_quotes_the_request_id_once():
    error = InternalError("internal error (request id abc123); the server logged the details",
                          "abc123")
    assert str(error).count("abc123") == 1
    assert str(InternalError("boom", "abc123")).count("abc123") == 1


def test_a_closed_pipe_ends_quietly(start_server):
    server = start_server()
    proc = subprocess.Popen([sys.executable, "-m", "peftserve.cli", "info", "--server",
                             server.target], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
