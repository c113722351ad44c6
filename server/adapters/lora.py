"""PEFT LoRA adapters (`peft_type: LORA`): parsing and validation against the base model."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils.other import get_pattern_key

from peftserve.adapters import config_values as cv
from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import SourceDir
from peftserve.errors import shorten
from peftserve.models.llama import ModelShape

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
_PARENT = {
    "q": "self_attn",
    "k": "self_attn",
    "v": "self_attn",
    "o": "self_attn",
    "gate": "mlp",
    "up": "mlp",
    "down": "mlp",
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q|k|v|o|gate|up|down)_proj\.lora_(A|B)\.weight$"
)
ALL_LINEAR = {f"{p}_proj" for p in PROJECTIONS}


def module_name(layer: int, proj: str) -> str:
    """The projection's module name in transformers' Llama (what PEFT patterns match)."""
    return f"model.layers.{layer}.{_PARENT[proj]}.{proj}_proj"


def module_dims(shape: ModelShape, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection in the base model."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return {
        "q": (shape.hidden, q),
        "k": (shape.hidden, kv),
        "v": (shape.hidden, kv),
        "o": (q, shape.hidden),
        "gate": (shape.hidden, shape.intermediate),
        "up": (shape.hidden, shape.intermediate),
        "down": (shape.intermediate, shape.hidden),
    }[proj]


@dataclass(frozen=True)
class LoraModule:
    A: torch.Tensor  # [rank, in]
    B: torch.Tensor  # [out, rank]
    scale: float


@dataclass(frozen=True)
class LoraWeights:
    modules: dict[tuple[int, str], LoraModule]  # (layer, projection) -> weights

    @property
    def num_params(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def ranks(self) -> dict[str, int]:
        """Rank of each projection (the largest over layers, as rank_pattern may vary it)."""
        out: dict[str, int] = {}
        for (_, proj), m in self.modules.items():
            out[proj] = max(out.get(proj, 0), m.A.shape[0])
        return out


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup, by PEFT's own matching rule."""
    return pattern.get(get_pattern_key(list(pattern), name), default)


# lora_alpha bounds: PEFT puts none, but a scale beyond cv.MAX_SCALE is refused anyway.
MAX_ALPHA = 1e6


def _rank(value: Any, field: str) -> int:
    return cv.integer(value, field, 1, 1 << 20)


def _alpha(value: Any, field: str) -> float:
    return cv.number(value, field, -MAX_ALPHA, MAX_ALPHA)


def _check_config(config: dict[str, Any]) -> None:
    for key in ("use_dora", "fan_in_fan_out", "lora_bias", "use_rslora"):
        cv.flag(config.get(key), key)
    _rank(config.get("r", 8), "r")
    _alpha(config.get("lora_alpha", 8), "lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in cv.mapping(config.get(key), key).items():
            field = f"{key}[{pattern[:64]!r}]"
            if key == "rank_pattern":
                _rank(value, field)
            else:
                _alpha(value, field)
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters (use_dora=true) are not supported")
    if config.get("modules_to_save"):
        raise InvalidAdapter(
            f"modules_to_save={config['modules_to_save']} is not supported: "
            "peftserve keeps every base weight frozen and shared"
        )
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias={shorten(config['bias'])} is not supported (only 'none')")
    if config.get("fan_in_fan_out"):
        raise InvalidAdapter("fan_in_fan_out=true is not supported for Llama-family models")
    if config.get("lora_bias"):
        raise InvalidAdapter("lora_bias=true is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise InvalidAdapter("target_modules must be a list of module names")
        wanted = {t.split(".")[-1] for t in targets}
        missing = sorted(wanted - ALL_LINEAR)
        if missing:
            raise InvalidAdapter(
                f"target modules the model lacks or peftserve cannot adapt: "
                f"{', '.join(missing)} (supported: {', '.join(sorted(ALL_LINEAR))})"
            )


def load_lora(
    source: SourceDir, config: dict[str, Any], shape: ModelShape, max_rank: int
) -> LoraWeights:
    _check_config(config)
    tensors = source.safetensors("adapter_model.safetensors")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise InvalidAdapter(
                f"unexpected tensor {shorten(key)}: peftserve adapts only the "
                f"q/k/v/o/gate/up/down projections of decoder layers"
            )
        layer, proj, ab = int(m.group(1)), m.group(3), m.group(4)
        if layer >= shape.layers:
            raise InvalidAdapter(
                f"tensor {key!r} is for layer {layer}; the base model has {shape.layers} layers"
            )
        pairs.setdefault((layer, proj), {})[ab] = t
    if not pairs:
        raise InvalidAdapter("adapter_model.safetensors holds no LoRA tensors")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern = cv.mapping(config.get("rank_pattern"), "rank_pattern")
    alpha_pattern = cv.mapping(config.get("alpha_pattern"), "alpha_pattern")
    modules = {}
    for (layer, proj), ab in sorted(pairs.items()):
        name = module_name(layer, proj)
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"{name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        A, B = ab["A"], ab["B"]
        d_in, d_out = module_dims(shape, proj)
        rank = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or B.shape != (d_out, rank):
            raise InvalidAdapter(
                f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the base "
                f"projection ({d_in} -> {d_out}); was the adapter trained for another model?"
            )
        if rank > max_rank:
            raise InvalidAdapter(f"{name} has rank {rank}, above this server's max rank {max_rank}")
        r = _rank(_pattern_value(rank_pattern, name, r_default), f"{name}'s r")
        alpha = _alpha(_pattern_value(alpha_pattern, name, alpha_default), f"{name}'s alpha")
        if r != rank:
            raise InvalidAdapter(f"{name}: tensors have rank {rank} but the config says r={r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        scale = cv.scale(scale, f"{name}'s scale (lora_alpha / r)")
        modules[(layer, proj)] = LoraModule(A.float().contiguous(), B.float().contiguous(), scale)
    return LoraWeights(modules)
