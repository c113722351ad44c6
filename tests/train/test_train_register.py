"""`--register HOST:PORT`: the trained adapter is uploaded to a running `peftserve serve` and
served there; training again under the same name replaces it."""

from __future__ import annotations

import sys

import pytest

from peftserve.client import Client, Sampling
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.train.register import RegisterError, register
from tests.e2e.server_process import ServerProcess
from tests.train.conftest import run_train

TOKEN = "train-register-token-0123456789"
PROMPT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_train_dir):
    root = tmp_path_factory.mktemp("register-server")
    (root / "token").write_text(TOKEN + "\n")
    proc = ServerProcess(["--model", str(tiny_train_dir), "--dtype", "float32", "--num-threads",
                          "1", "--num-kv-blocks", "128", "--admin-token-file",
                          str(root / "token")], root / "server.log").start()
    yield proc, root / "token"
    proc.terminate()


def _local_greedy(model_dir, adapter_dir) -> list[int]:
    engine = Engine.from_config(EngineConfig(model=str(model_dir), dtype="float32",
                                             num_kv_blocks=64))
    engine.adapters.register("a", adapter_dir)
    res = engine.generate([Request("r", messages=tuple(PROMPT), adapter="a",
                                   params=SamplingParams(max_new_tokens=8, ignore_eos=True))])
    return [t for o in res["r"] for t in o.token_ids]


def test_trained_adapter_is_registered_then_replaced(server, tmp_path, tiny_train_dir, toy_data):
    proc, token_file = server
    served = []
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        rc = run_train("--method", "lora", "--data", str(toy_data["train"]), "--out", str(out),
                       "--base", str(tiny_train_dir), "--epochs", "1", "--lr", "1e-2",
                       "--seed", seed, "--register", proc.target, "--name", "toy",
                       "--admin-token-file", str(token_file))
        assert rc == 0
        with Client(proc.target, timeout=30) as client:
            (info,) = [a for a in client.list_adapters() if a.name == "toy"]
            assert info.kind == "lora"
            got = client.generate(messages=PROMPT, adapter="toy",
                                  sampling=Sampling(max_new_tokens=8, ignore_eos=True))
        assert got.token_ids == _local_greedy(tiny_train_dir, out)
        served.append(got.token_ids)
    assert served[0] != served[1]  # the second run's weights replaced the first's


def test_wrong_admin_token_fails_clearly_and_keeps_the_adapter(server, tmp_path, tiny_train_dir,
                                                               toy_data, capsys):
    proc, _ = server
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token")
    out = tmp_path / "adapter"
    rc = run_train("--method", "prompt", "--data", str(toy_data["train"]), "--out", str(out),
                   "--base", str(tiny_train_dir), "--epochs", "1", "--num-virtual-tokens", "2",
                   "--register", proc.target, "--admin-token-file", str(bad))
    assert rc == 1
    err = capsys.readouterr().err
    assert "registering 'adapter' with" in err and f"saved in {out}" in err
    assert (out / "adapter_model.safetensors").is_file()


def test_missing_client_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peftserve.client", None)  # import fails
    with pytest.raises(RegisterError, match="needs the peftserve gRPC client"):
        register("127.0.0.1:1", "x", tmp_path)
