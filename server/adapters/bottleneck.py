"""Bottleneck adapters (Houlsby / Pfeiffer) in peftserve's own safetensors format.

Config fields follow AdapterHub: `reduction_factor`, `non_linearity`, `mh_adapter` (after the
attention output projection), `output_adapter` (after the MLP's down projection), `scaling`.
Houlsby = both placements, Pfeiffer = output only. At each placement, with `y` the sub-layer's
output before the residual add:

    y <- y + scaling * (W_up act(W_down y + b_down) + b_up)

Tensors: `layers.{i}.{mh_adapter|output_adapter}.{down|up}.{weight|bias}`, down.weight
[hidden // reduction_factor, hidden], up.weight [hidden, hidden // reduction_factor].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftserve.adapters import config_values as cv
from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import SourceDir
from peftserve.errors import shorten
from peftserve.kernels.activation import ACTIVATION_NAMES, activation_fn
from peftserve.models.llama import ModelShape

PLACEMENTS = ("mh_adapter", "output_adapter")
# The kernels' activations (kernels/activation.py) and AdapterHub's other name for silu.
_ALIASES = {"swish": "silu"}
ACTIVATIONS: tuple[str, ...] = (*ACTIVATION_NAMES, *_ALIASES)
PRESETS = {  # AdapterHub's defaults
    "houlsby": dict(
        mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="swish"
    ),
    "pfeiffer": dict(
        mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu"
    ),
}
_KEY = re.compile(r"^layers\.(\d+)\.(mh_adapter|output_adapter)\.(down|up)\.(weight|bias)$")


def canonical_activation(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidAdapter("non_linearity must be a string")
    name = name.lower()
    if name not in ACTIVATIONS:
        raise InvalidAdapter(
            f"non_linearity {shorten(name)} is not supported ({', '.join(ACTIVATIONS)})"
        )
    return _ALIASES.get(name, name)


class BottleneckModule(nn.Module):
    """One bottleneck at one placement; used for training and as the reference."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, scaling: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.act = activation_fn(canonical_activation(activation))
        self.scaling = scaling

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # y: [..., hidden] -> y + scaling * up(act(down(y)))
        return y + self.scaling * self.up(self.act(self.down(y)))


@dataclass(frozen=True)
class BottleneckWeights:
    activation: str  # relu | silu | gelu
    scaling: float
    # (layer, placement) -> (down.weight [r, hidden], down.bias [r], up.weight [hidden, r],
    #                        up.bias [hidden])
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def num_params(self) -> int:
        return sum(t.numel() for m in self.modules.values() for t in m)

    @property
    def rank(self) -> int:
        return next(iter(self.modules.values()))[0].shape[0]


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    preset = config.get("architecture")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise InvalidAdapter(f"architecture {shorten(preset)} is not one of {', '.join(PRESETS)}")
    merged: dict[str, Any] = dict(PRESETS[preset]) if preset is not None else {}
    merged.update(
        {
            k: v
            for k, v in config.items()
            if k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "scaling")
        }
    )
    merged.setdefault("scaling", 1.0)
    # original_ln_*/residual_before_ln describe post-norm (BERT) models; Llama is pre-norm and the
    # adapter sits on the sub-layer output before the residual add, so they have no meaning here.
    for key in ("mh_adapter", "output_adapter"):
        merged[key] = cv.flag(merged.get(key), key)
    merged["scaling"] = cv.number(merged["scaling"], "scaling", -cv.MAX_SCALE, cv.MAX_SCALE)
    for key in ("ln_before", "ln_after"):
        if cv.flag(config.get(key), key):
            raise InvalidAdapter(f"{key}=true (extra layer norms) is not supported")
    if not (merged.get("mh_adapter") or merged.get("output_adapter")):
        raise InvalidAdapter("a bottleneck adapter needs mh_adapter and/or output_adapter")
    if "reduction_factor" not in merged or "non_linearity" not in merged:
        raise InvalidAdapter("reduction_factor and non_linearity are required")
    return merged


def load_bottleneck(
    source: SourceDir, config: dict[str, Any], shape: ModelShape, max_rank: int
) -> BottleneckWeights:
    cfg = resolve_config(config)
    activation = canonical_activation(cfg["non_linearity"])
    rf = cv.number(cfg["reduction_factor"], "reduction_factor", 0, 1e9)
    if rf <= 0:
        raise InvalidAdapter(f"reduction_factor must be > 0, got {rf}")
    r = int(shape.hidden // rf)
    if not 1 <= r <= max_rank:
        raise InvalidAdapter(
            f"bottleneck size {r} (hidden {shape.hidden} / reduction_factor {rf}) "
            f"must be in 1..{max_rank}, this server's max rank"
        )
    tensors = source.safetensors("adapter_model.safetensors")
    placements = [p for p in PLACEMENTS if cfg.get(p)]
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in placements:
            raise InvalidAdapter(f"unexpected tensor {shorten(key)} for placements {placements}")
        layer = int(m.group(1))
        if layer >= shape.layers:
            raise InvalidAdapter(
                f"tensor {key!r} is for layer {layer}; the base model has {shape.layers} layers"
            )
        found.setdefault((layer, m.group(2)), {})[f"{m.group(3)}.{m.group(4)}"] = t
    expected = {
        "down.weight": (r, shape.hidden),
        "down.bias": (r,),
        "up.weight": (shape.hidden, r),
        "up.bias": (shape.hidden,),
    }
    modules = {}
    for layer in range(shape.layers):
        for p in placements:
            parts = found.get((layer, p), {})
            for name, want in expected.items():
                got = parts.get(name)
                if got is None:
                    raise InvalidAdapter(f"layers.{layer}.{p}.{name} is missing")
                if tuple(got.shape) != want:
                    raise InvalidAdapter(
                        f"layers.{layer}.{p}.{name} has shape {tuple(got.shape)}, expected {want} "
                        f"(hidden {shape.hidden}, reduction_factor {rf})"
                    )
            modules[(layer, p)] = tuple(parts[n].float().contiguous() for n in expected)
    return BottleneckWeights(activation, float(cfg["scaling"]), modules)  # type: ignore[arg-type]
