"""Tiny training runs shared by the tests: one `peftserve train` per method on the tiny Llama."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftserve.cli import main
from tests.tiny import make_model_dir

METHODS = ("lora", "adapter", "prefix", "prompt")
# Tiny-model settings: a few seconds per method. Learning rates are far above the defaults
# because the random tiny model has nothing useful to build on.
TINY_FLAGS = {
    "lora": ["--lr", "1e-2", "--targets", "all-linear"],
    "adapter": ["--lr", "3e-2", "--architecture", "houlsby", "--reduction-factor", "8"],
    "prefix": ["--lr", "3e-1", "--num-virtual-tokens", "4"],
    "prompt": ["--lr", "1e-1", "--num-virtual-tokens", "4"],
}
_PHRASES = ("the quick brown fox", "hello world", "low rank adaptation", "how are you today",
            "peftserve serves many adapters", "the lazy dog")
LABELS = ("positive", "negative", "neutral")


def label_of(phrase: str) -> str:
    return LABELS[_PHRASES.index(phrase) % 3]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(n: int, seed: int, flip: bool = False) -> list[dict]:
    """Chat and prompt/completion lines mapping a phrase to its label (`flip`: a wrong one)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        phrase = rng.choice(_PHRASES)
        label = label_of(phrase)
        if flip:
            label = LABELS[(LABELS.index(label) + 1) % 3]
        if i % 2:
            rows.append({"prompt": f"{phrase} =", "completion": f" {label}"})
        else:
            rows.append({"messages": [{"role": "user", "content": phrase},
                                      {"role": "assistant", "content": label}]})
    return rows


def run_train(*args: str) -> int:
    return main(["train", *args])


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and much faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_train_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a wider initialisation: with the frozen lm_head of the default one
    (std 0.02 behind a final norm) no logit can move far, so no adapter can fit anything."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-train"), initializer_range=0.1)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy-data")
    return {"train": write_jsonl(root / "train.jsonl", toy_rows(48, 0)),
            "eval": write_jsonl(root / "eval.jsonl", toy_rows(12, 1))}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_train_dir, toy_data):
    """method -> its output directory, trained once per session."""
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"trained-{method}") / "adapter"
            rc = run_train("--method", method, "--data", str(toy_data["train"]),
                           "--eval", str(toy_data["eval"]), "--out", str(out),
                           "--base", str(tiny_train_dir), "--batch-size", "8",
                           *TINY_FLAGS[method])
            assert rc == 0
            cache[method] = out
        return cache[method]

    return get
