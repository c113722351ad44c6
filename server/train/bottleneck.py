"""Trainable bottleneck adapters injected into a transformers Llama-family model.

`BottleneckModule`s act through forward hooks on each layer's `self_attn.o_proj` (mh_adapter) and
`mlp.down_proj` (output_adapter): y <- y + scaling * up(act(down(y))), the placement the server
and `tests/adapters.py::bottleneck_reference` use. The modules live in the model as the submodule
`peftserve_bottleneck`, so optimizers and DDP see their parameters. Saved in peftserve's own format
(`adapter_config.json` with `peftserve_type: BOTTLENECK` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from peftserve.adapters.bottleneck import PRESETS, BottleneckModule

ATTRIBUTE = "peftserve_bottleneck"
_TARGETS = {"mh_adapter": ("self_attn", "o_proj"), "output_adapter": ("mlp", "down_proj")}


def resolve(architecture: str, reduction_factor: int | None, non_linearity: str | None,
            scaling: float) -> dict[str, Any]:
    """The full adapter config: the preset with the given overrides."""
    cfg: dict[str, Any] = {"peftserve_type": "BOTTLENECK", "architecture": architecture,
                           **PRESETS[architecture], "scaling": scaling}
    if reduction_factor is not None:
        cfg["reduction_factor"] = reduction_factor
    if non_linearity is not None:
        cfg["non_linearity"] = non_linearity
    return cfg


def inject(model: nn.Module, cfg: dict[str, Any], dropout: float) -> nn.ModuleDict:
    """Adds zero-output bottlenecks (up starts at 0, as AdapterHub does) to every layer."""
    hidden = model.config.hidden_size
    size = hidden // int(cfg["reduction_factor"])
    if size < 1:
        raise ValueError(f"reduction_factor {cfg['reduction_factor']} leaves no bottleneck for "
                         f"hidden size {hidden}")
    modules = nn.ModuleDict()
    for i, layer in enumerate(model.model.layers):
        for placement, (parent, proj) in _TARGETS.items():
            if not cfg[placement]:
                continue
            mod = BottleneckModule(hidden, size, cfg["non_linearity"], float(cfg["scaling"]))
            nn.init.normal_(mod.down.weight, std=1e-2)
            nn.init.zeros_(mod.down.bias)
            nn.init.zeros_(mod.up.weight)
            nn.init.zeros_(mod.up.bias)
            modules[f"{i}_{placement}"] = mod
            target = getattr(getattr(layer, parent), proj)
            target.register_forward_hook(lambda _m, _i, y, mod=mod: _apply(mod, dropout, y))
    model.add_module(ATTRIBUTE, modules)
    return modules


def _apply(mod: BottleneckModule, dropout: float, y: torch.Tensor) -> torch.Tensor:
    # y: [B, T, hidden]; dropout (train mode only) on the adapter's contribution, not the residual
    delta = mod.up(mod.act(mod.down(y)))
    return y + mod.scaling * F.dropout(delta, dropout, training=mod.training)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`layers.{i}.{placement}.{down|up}.{weight|bias}` -> tensor, the on-disk names."""
    out = {}
    for key, mod in getattr(model, ATTRIBUTE).items():
        layer, placement = key.split("_", 1)
        for name, tensor in mod.state_dict().items():
            out[f"layers.{layer}.{placement}.{name}"] = tensor.detach().float().cpu().contiguous()
    return out


def save(model: nn.Module, cfg: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(trainable_state(model), out / "adapter_model.safetensors")
