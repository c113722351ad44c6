"""PEFT prefix tuning and prompt tuning: virtual tokens in front of every prompt.

Prefix tuning (`prompt_embeddings` [V, num_layers * 2 * kv_heads * head_dim]) is viewed as
[V, 2 * layers, kv_heads, head_dim]: layer l's keys at index 2l, values at 2l + 1, written into the
cache as they are (no RoPE). Prompt tuning (`prompt_embeddings` [V, hidden]) supplies input
embeddings for positions 0..V-1. Either way the prompt's own tokens take positions V.. as PEFT
computes them.
"""

from __future__ import annotations

from typing import Any

import torch

from peftserve.adapters import config_values as cv
from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import SourceDir
from peftserve.models.llama import ModelShape


def _embeddings(source: SourceDir, config: dict[str, Any], max_virtual_tokens: int) -> torch.Tensor:
    tensors = source.safetensors("adapter_model.safetensors")
    if set(tensors) != {"prompt_embeddings"}:
        raise InvalidAdapter(f"expected one tensor 'prompt_embeddings', found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    if "num_virtual_tokens" not in config:
        raise InvalidAdapter("num_virtual_tokens is missing")
    v = cv.integer(config["num_virtual_tokens"], "num_virtual_tokens", 1, 1 << 20)
    for key in ("num_layers", "token_dim"):
        if config.get(key) is not None:
            cv.integer(config[key], key, 1, 1 << 20)
    if emb.dim() != 2 or emb.shape[0] != v:
        raise InvalidAdapter(
            f"prompt_embeddings has shape {tuple(emb.shape)}; num_virtual_tokens is {v}"
        )
    if not 1 <= v <= max_virtual_tokens:
        raise InvalidAdapter(f"num_virtual_tokens {v} must be in 1..{max_virtual_tokens}")
    return emb


def load_prefix_tuning(
    source: SourceDir, config: dict[str, Any], shape: ModelShape, max_virtual_tokens: int
) -> torch.Tensor:
    """-> K/V of the virtual tokens, [layers, 2, V, kv_heads, head_dim] fp32."""
    emb = _embeddings(source, config, max_virtual_tokens)
    kv_dim = shape.kv_heads * shape.head_dim
    if config.get("num_layers", shape.layers) != shape.layers:
        raise InvalidAdapter(
            f"num_layers {config['num_layers']} differs from the base model's {shape.layers}"
        )
    if config.get("token_dim", kv_dim) != kv_dim or emb.shape[1] != shape.layers * 2 * kv_dim:
        raise InvalidAdapter(
            f"prompt_embeddings has width {emb.shape[1]}, token_dim {config.get('token_dim')}; the "
            f"base model needs token_dim = kv_heads * head_dim = {kv_dim} and width "
            f"{shape.layers * 2 * kv_dim}"
        )
    v = emb.shape[0]
    kv = emb.float().view(v, shape.layers, 2, shape.kv_heads, shape.head_dim)
    return kv.permute(1, 2, 0, 3, 4).contiguous()


def load_prompt_tuning(
    source: SourceDir, config: dict[str, Any], shape: ModelShape, max_virtual_tokens: int
) -> torch.Tensor:
    """-> virtual-token input embeddings [V, hidden] fp32."""
    emb = _embeddings(source, config, max_virtual_tokens)
    if emb.shape[1] != shape.hidden or config.get("token_dim", shape.hidden) != shape.hidden:
        raise InvalidAdapter(
            f"prompt_embeddings has width {emb.shape[1]}; the base model's hidden "
            f"size is {shape.hidden}"
        )
    return emb.float().contiguous()
