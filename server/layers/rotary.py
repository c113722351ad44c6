"""Rotary position embeddings with every scaling transformers knows (`rope_parameters`)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from peftserve.errors import UnsupportedModel


def _default_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return inv_freq, 1.0


class RotaryEmbedding:
    """cos/sin tables for positions, computed once per step and shared by all layers."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device) -> None:
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config, head_dim)
        elif rope_type == "dynamic":
            # Dynamic NTK changes the frequencies with the running sequence length, so one
            # batch would need several tables; refusing is clearer than being subtly wrong.
            raise UnsupportedModel("rope_type 'dynamic' is not supported")
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
        else:
            raise UnsupportedModel(f"unknown rope_type {rope_type!r}")
        self.inv_freq = inv_freq.float().to(device)
        self.scaling = float(scaling)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, head_dim] (broadcast over heads)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:  # x * 1.0 is x: two ops fewer a step for most models
            cos, sin = cos * self.scaling, sin * self.scaling
        cos, sin = cos.to(dtype), sin.to(dtype)
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
