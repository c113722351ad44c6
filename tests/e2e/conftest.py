from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.server_process import ServerProcess

ADMIN_TOKEN = "e2e-admin-token-0123456789"

# Small and quick on 2 shared cores: one torch thread, a KV cache of 256 blocks x 16 tokens.
TINY_SERVER_ARGS = ["--dtype", "float32", "--num-threads", "1", "--num-kv-blocks", "256"]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory, tiny_llama_dir):
    """Starts `peftserve serve` on the tiny model with extra flags; stopped at module end."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(["--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, *args], log)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.terminate()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")
    path.chmod(0o600)
    return path
