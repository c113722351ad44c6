"""Reading an adapter directory safely: JSON config, safetensors only, finite tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftserve.adapters.errors import InvalidAdapter

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapter(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path.name} must hold a JSON object")
    return data


def read_safetensors(directory: Path, filename: str) -> dict[str, torch.Tensor]:
    """Loads `filename`; refuses pickle checkpoints (they can run code when loaded)."""
    path = directory / filename
    if not path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidAdapter(
                f"found pickle weights ({', '.join(pickles)}); peftserve loads safetensors only "
                f"— re-save with safe_serialization=True"
            )
        raise InvalidAdapter(f"{filename} is missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidAdapter(f"{filename} is not a readable safetensors file: {e}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise InvalidAdapter(f"tensor {name} has dtype {t.dtype}; expected floating point")
        if not torch.isfinite(t).all():
            raise InvalidAdapter(f"tensor {name} contains NaN or Inf")
    return tensors


def expect_keys(config: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InvalidAdapter(f"unknown {what} fields: {', '.join(unknown)}")
