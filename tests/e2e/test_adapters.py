"""Adapters of every kind registered, used and unregistered at runtime through the server; each
served request's greedy tokens equal the offline engine's for the same adapter. Registration
refuses paths outside the adapter root, pickles and bad files, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys

import pytest
import torch

from peftserve.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    Sampling,
)
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.e2e.conftest import ADMIN_TOKEN

MESSAGES = [{"role": "user", "content": "hello world, how are you today?"}]
SAMPLING = Sampling(max_new_tokens=10, ignore_eos=True)
MAX_INLINE_BYTES = 2 << 20
KINDS = {"lora": "lora", "houlsby": "bottleneck", "prefix": "prefix_tuning",
         "prompt": "prompt_tuning", "template": "prompt_template"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def staging(tmp_path_factory):
    return tmp_path_factory.mktemp("staging")


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, root):
    return {
        "lora": A.make_lora(tiny_llama_dir, root / "lora", r=4, seed=1),
        "lora-b": A.make_lora(tiny_llama_dir, root / "lora-b", r=8, seed=2, targets=A.ALL_LINEAR),
        "houlsby": A.make_bottleneck(tiny_llama_dir, root / "houlsby", "houlsby", seed=3),
        "prefix": A.make_prefix_tuning(tiny_llama_dir, root / "prefix", virtual=5, seed=4),
        "prompt": A.make_prompt_tuning(tiny_llama_dir, root / "prompt", virtual=3, seed=5),
        "template": A.make_template(root / "template", system="Be brief.",
                                    few_shot=[{"user": "hi", "assistant": "hello"}]),
    }


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, adapter_dirs):
    """Greedy tokens from the offline engine, each request alone: adapter name -> tokens."""
    engine = Engine.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                             num_kv_blocks=256))
    out: dict[str | None, list[int]] = {}
    for name in [None, *adapter_dirs]:
        if name is not None:
            engine.adapters.register(name, adapter_dirs[name])
        req = Request(f"oracle-{name}", messages=tuple(MESSAGES), adapter=name,
                      params=SamplingParams(max_new_tokens=10, ignore_eos=True))
        out[name] = [t for o in engine.generate([req])[req.request_id] for t in o.token_ids]
    return out


@pytest.fixture(scope="module")
def server(start_server, token_file, root, staging, adapter_dirs):
    return start_server("--adapter-root", str(root), "--staging-dir", str(staging),
                        "--admin-token-file", str(token_file),
                        "--max-inline-adapter-bytes", str(MAX_INLINE_BYTES))


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60, admin_token=ADMIN_TOKEN) as c:
        yield c


@pytest.fixture(autouse=True)
def nothing_left_behind(client, staging):
    yield
    for info in client.list_adapters():
        client.unregister_adapter(info.name)
    assert list(staging.iterdir()) == []


def tokens(client: Client, adapter: str | None) -> list[int]:
    return client.generate(messages=MESSAGES, adapter=adapter, sampling=SAMPLING).token_ids


@pytest.mark.parametrize("name", list(KINDS))
def test_register_use_unregister_every_kind(client, expected, name):
    info = client.register_adapter(name, name)  # a path relative to the adapter root
    assert (info.name, info.kind) == (name, KINDS[name])
    assert [a.name for a in client.list_adapters()] == [name]
    out = client.generate(messages=MESSAGES, adapter=name, sampling=SAMPLING)
    assert out.adapter_kind == KINDS[name]
    assert out.token_ids == expected[name]
    assert out.token_ids != expected[None], "the adapter changed nothing"
    streamed = [t for c in client.generate_stream(messages=MESSAGES, adapter=name,
                                                  sampling=SAMPLING) for t in c.token_ids]
    assert streamed == expected[name]
    shown = client.get_adapter(name)
    assert shown.requests_served == 2
    assert shown.residency in ("device", "host", "disk")
    client.unregister_adapter(name)
    with pytest.raises(NotFoundError):
        client.generate(messages=MESSAGES, adapter=name, sampling=SAMPLING)
    assert tokens(client, None) == expected[None]


def test_every_kind_in_flight_together(server, client, expected, adapter_dirs):
    for name in adapter_dirs:
        client.register_adapter(name, name)

    async def run() -> dict[str | None, list[int]]:
        async with AsyncClient(server.target, timeout=60) as c:
            async def one(name: str | None) -> list[int]:
                return [t async for chunk in c.generate_stream(
                    messages=MESSAGES, adapter=name, sampling=SAMPLING) for t in chunk.token_ids]

            names = [None, *adapter_dirs]
            results = await asyncio.gather(*(one(n) for n in names))
            return dict(zip(names, results, strict=True))

    assert asyncio.run(run()) == expected


def test_inline_upload_is_staged_and_cleaned(client, expected, adapter_dirs, staging):
    info = client.register_adapter("uploaded", directory=adapter_dirs["lora"])
    assert info.kind == "lora"
    staged = [p for p in staging.iterdir()]
    assert len(staged) == 1 and info.source == str(staged[0])
    assert sorted(p.name for p in staged[0].iterdir()) == ["adapter_config.json",
                                                           "adapter_model.safetensors"]
    assert tokens(client, "uploaded") == expected["lora"]
    client.unregister_adapter("uploaded")
    assert list(staging.iterdir()) == []


def test_already_exists_then_replace(client, expected):
    client.register_adapter("task", "lora")
    with pytest.raises(AlreadyExistsError):
        client.register_adapter("task", "lora-b")
    assert tokens(client, "task") == expected["lora"]
    client.register_adapter("task", "lora-b", replace=True)
    assert tokens(client, "task") == expected["lora-b"]
    assert [a.name for a in client.list_adapters()] == ["task"]


def test_replace_inline_by_inline_keeps_one_staged_copy(client, adapter_dirs, staging, expected):
    client.register_adapter("up", directory=adapter_dirs["lora"])
    client.register_adapter("up", directory=adapter_dirs["lora-b"], replace=True)
    assert len(list(staging.iterdir())) == 1
    assert tokens(client, "up") == expected["lora-b"]


def test_paths_outside_the_root_are_refused(client, tiny_llama_dir, root, tmp_path):
    outside = A.make_lora(tiny_llama_dir, tmp_path / "outside", r=2)
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (sneaky / "adapter_model.safetensors").write_bytes(
        (outside / "adapter_model.safetensors").read_bytes())
    for path in ["../" + os.path.relpath(outside, root.parent), str(outside), "link-out",
                 "sneaky", "lora/../../" + outside.name, "/etc", ".", ""]:
        with pytest.raises(InvalidArgumentError, match="outside the adapter root|path is empty"):
            client.register_adapter("evil", path)
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        client.register_adapter("evil", "no-such-dir")
    assert client.list_adapters() == []


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def test_pickles_are_refused(client, adapter_dirs, root):
    config = (adapter_dirs["lora"] / "adapter_config.json").read_bytes()
    pickle = _pickle_bytes()
    for files in ({"adapter_config.json": config, "adapter_model.bin": pickle},
                  {"adapter_config.json": config, "adapter_model.safetensors": pickle},
                  {"adapter_config.json": config, "adapter_model.pt": b"anything"}):
        with pytest.raises(InvalidArgumentError, match="pickle"):
            client.register_adapter("evil", files=files)
    on_disk = root / "pickled"
    on_disk.mkdir()
    (on_disk / "adapter_config.json").write_bytes(config)
    (on_disk / "adapter_model.bin").write_bytes(pickle)
    with pytest.raises(InvalidArgumentError, match="pickle"):
        client.register_adapter("evil", "pickled")
    assert client.list_adapters() == []


def test_bad_files_are_refused_with_the_reason(client, adapter_dirs):
    config = (adapter_dirs["lora"] / "adapter_config.json").read_bytes()
    weights = (adapter_dirs["lora"] / "adapter_model.safetensors").read_bytes()
    cases = [
        ({"adapter_model.safetensors": weights}, "no adapter_config.json"),
        ({"adapter_config.json": b"{not json", "adapter_model.safetensors": weights}, "JSON"),
        ({"adapter_config.json": config}, "adapter_model.safetensors is missing"),
        ({"adapter_config.json": config, "../adapter_model.safetensors": weights},
         "plain file name"),
        ({"adapter_config.json": config, "adapter_model.safetensors": weights,
          "README.md": b"hi"}, "only .json and .safetensors"),
        ({"adapter_config.json": config, "adapter_model.safetensors": b"\0" * (5 << 19)},
         "the limit is"),
    ]
    for files, reason in cases:
        with pytest.raises(InvalidArgumentError, match=reason):
            client.register_adapter("bad", files=files)
    with pytest.raises(InvalidArgumentError, match="adapter name"):
        client.register_adapter("../bad", "lora")
    with pytest.raises(ResourceExhaustedError, match="larger than max"):  # gRPC's own cap
        client.register_adapter("bad", files={"adapter_config.json": b"\0" * (4 << 20)})
    assert client.list_adapters() == []


def test_cli_adapter_commands(server, root):
    env = {**os.environ, "PEFTSERVE_ADMIN_TOKEN": ADMIN_TOKEN}

    def cli(command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "peftserve.cli", *command.split(),
                               "--server", server.target, *args], capture_output=True, text=True,
                              env=env, timeout=60)

    reg = cli("adapters register", "cli-lora", "--path", "lora")
    assert reg.returncode == 0, reg.stderr
    assert "registered cli-lora: lora" in reg.stdout
    listed = cli("adapters list")
    assert "cli-lora" in listed.stdout and "lora" in listed.stdout
    shown = cli("adapters show", "cli-lora")
    assert '"kind": "lora"' in shown.stdout
    gen = cli("generate", "--adapter", "cli-lora", "--max-new-tokens", "4", "--ignore-eos",
              "hi")
    assert gen.returncode == 0 and "adapter kind: lora" in gen.stderr
    assert cli("adapters unregister", "cli-lora").returncode == 0
    gone = cli("adapters show", "cli-lora")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr

