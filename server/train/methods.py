"""Each method turns the frozen base model into one with trainable adapter weights and knows how
to save them in the format the server loads: PEFT for LoRA / prefix / prompt tuning, peftserve's
bottleneck format for `adapter`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from torch import nn

from peftserve.train import bottleneck
from peftserve.train.config import TrainConfig


@dataclass
class Adapted:
    model: nn.Module  # forward(input_ids, attention_mask, logits_to_keep) -> output.logits
    save: Callable[[Path], None]  # writes the adapter directory
    base_params: int
    input_offset: int = 0  # positions put in front of the input (prompt tuning's virtual tokens)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build(config: TrainConfig, base: nn.Module) -> Adapted:
    """`base` is frozen here; the returned model holds it."""
    base_params = sum(p.numel() for p in base.parameters())
    for p in base.parameters():
        p.requires_grad_(False)
    if config.method == "adapter":
        cfg = bottleneck.resolve(config.architecture, config.reduction_factor,
                                 config.non_linearity, config.scaling)
        bottleneck.inject(base, cfg, config.dropout)
        return Adapted(base, lambda out: bottleneck.save(base, cfg, out), base_params)
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        model = get_peft_model(base, _peft_config(config))
    if config.method == "prefix":
        _init_prefix_from_activations(model, base, config.num_virtual_tokens, config.seed)
    offset = config.num_virtual_tokens if config.method == "prompt" else 0
    return Adapted(model, lambda out: _save_peft(model, out), base_params, offset)


def _peft_config(config: TrainConfig) -> LoraConfig | PrefixTuningConfig | PromptTuningConfig:
    if config.method == "lora":
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          target_modules=list(config.targets), lora_dropout=config.dropout,
                          task_type="CAUSAL_LM")
    if config.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens,
                                  task_type="CAUSAL_LM")
    # Virtual tokens start as embeddings of random vocabulary tokens: at the scale of real
    # inputs, unlike PEFT's default N(0, 1).
    return PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                              task_type="CAUSAL_LM")


@torch.no_grad()
def _init_prefix_from_activations(model: PeftModel, base: nn.Module, virtual: int,
                                  seed: int) -> None:
    """Starts the prefix as the keys and values the base model computes for `virtual` random
    vocabulary tokens at positions 0..V-1 (Li & Liang's initialisation from real activations),
    where PEFT places them: the model starts as if those tokens preceded every prompt, instead
    of attending to N(0, 1) noise."""
    ids = torch.randint(base.config.vocab_size, (1, virtual),
                        generator=torch.Generator().manual_seed(seed))
    out = base(input_ids=ids, use_cache=True)
    # the output's cache is `cache` in later transformers 5 releases, `past_key_values` before
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    # PEFT's prompt_embeddings row v: [layers, (key, value), kv_heads, head_dim] flattened
    columns = []
    for layer in cache.layers:
        for t in (layer.keys, layer.values):  # [1, kv_heads, V, head_dim]
            columns.append(t[0].transpose(0, 1).reshape(virtual, -1))
    weight = model.prompt_encoder["default"].embedding.weight  # [V, layers * 2 * kv_dim]
    weight.copy_(torch.cat(columns, dim=1))


def _save_peft(model: PeftModel, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
