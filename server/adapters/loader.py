"""Reads an adapter directory of any kind into validated host tensors (`LoadedAdapter`).

Runs off the engine thread: it reads files and checks them, and touches no engine state.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from peftserve.adapters.bottleneck import BottleneckWeights, load_bottleneck
from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import FileDigest, SourceDir
from peftserve.adapters.handle import AdapterKind
from peftserve.adapters.lora import LoraWeights, load_lora
from peftserve.adapters.prefix import load_prefix_tuning, load_prompt_tuning
from peftserve.adapters.template import PromptTemplate, parse_template
from peftserve.errors import shorten
from peftserve.models.llama import ModelShape


@dataclass(frozen=True)
class AdapterLimits:
    max_lora_rank: int = 64
    max_virtual_tokens: int = 256


@dataclass(frozen=True)
class LoadedAdapter:
    kind: AdapterKind
    lora: LoraWeights | None = None
    bottleneck: BottleneckWeights | None = None
    prefix_kv: torch.Tensor | None = None  # [layers, 2, V, kv_heads, head_dim]
    prompt_embeds: torch.Tensor | None = None  # [V, hidden]
    template: PromptTemplate | None = None
    load_time_s: float = 0.0
    # What was read, by file name: kept from registration so that every reload reads the same
    # files with the same bytes (files.SourceDir).
    files: dict[str, FileDigest] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        if self.lora is not None:
            return self.lora.num_params
        if self.bottleneck is not None:
            return self.bottleneck.num_params
        for t in (self.prefix_kv, self.prompt_embeds):
            if t is not None:
                return t.numel()
        return 0

    @property
    def num_bytes(self) -> int:
        return self.num_params * 4

    def ranks(self) -> dict[str, int]:
        if self.lora is not None:
            return self.lora.ranks()
        if self.bottleneck is not None:
            return {p: self.bottleneck.rank for (_, p) in self.bottleneck.modules}
        if self.prefix_kv is not None:
            return {"virtual_tokens": self.prefix_kv.shape[2]}
        if self.prompt_embeds is not None:
            return {"virtual_tokens": self.prompt_embeds.shape[0]}
        return {}


def adapter_kind(config: dict) -> AdapterKind:
    peft_type = str(config.get("peft_type") or "").upper()
    own_type = str(config.get("peftserve_type") or "").upper()
    kinds = {
        "LORA": AdapterKind.LORA,
        "PREFIX_TUNING": AdapterKind.PREFIX_TUNING,
        "PROMPT_TUNING": AdapterKind.PROMPT_TUNING,
        "BOTTLENECK": AdapterKind.BOTTLENECK,
        "PROMPT_TEMPLATE": AdapterKind.PROMPT_TEMPLATE,
    }
    kind = kinds.get(own_type or peft_type)
    if kind is None:
        raise InvalidAdapter(
            f"unsupported adapter type {own_type or peft_type or '(none)'}: peftserve serves PEFT "
            "LORA, PREFIX_TUNING, PROMPT_TUNING and its own BOTTLENECK and PROMPT_TEMPLATE"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise InvalidAdapter(f"task_type {shorten(config['task_type'])} is not CAUSAL_LM")
    return kind


def load_adapter(directory: Path, shape: ModelShape, limits: AdapterLimits,
                 expected: Mapping[str, FileDigest] | None = None) -> LoadedAdapter:
    """Raises InvalidAdapter naming the problem, also for what the file system refuses (a path
    too long, a symlink loop, no permission). With `expected` (a reload: the registration's
    `files`), AdapterChanged when a file now leads elsewhere or has other bytes."""
    try:
        return _load(SourceDir(directory, expected), shape, limits)
    except OSError as e:
        name = shorten(Path(e.filename).name) if e.filename else shorten(directory.name)
        raise InvalidAdapter(f"cannot read the adapter's files: {e.strerror or e} ({name})"
                             ) from None
    except RuntimeError as e:  # pathlib's "Symlink loop from ..."
        if "loop" not in str(e).lower():
            raise
        raise InvalidAdapter("the adapter's path holds a symlink loop") from None


def _load(source: SourceDir, shape: ModelShape, limits: AdapterLimits) -> LoadedAdapter:
    t0 = time.perf_counter()
    if not source.path.is_dir():
        raise InvalidAdapter(f"{shorten(str(source.path))} is not a directory")
    config = source.json("adapter_config.json")
    kind = adapter_kind(config)
    if kind is AdapterKind.LORA:
        out = LoadedAdapter(kind, lora=load_lora(source, config, shape, limits.max_lora_rank))
    elif kind is AdapterKind.BOTTLENECK:
        out = LoadedAdapter(
            kind, bottleneck=load_bottleneck(source, config, shape, limits.max_lora_rank)
        )
    elif kind is AdapterKind.PREFIX_TUNING:
        out = LoadedAdapter(
            kind, prefix_kv=load_prefix_tuning(source, config, shape, limits.max_virtual_tokens)
        )
    elif kind is AdapterKind.PROMPT_TUNING:
        out = LoadedAdapter(
            kind,
            prompt_embeds=load_prompt_tuning(source, config, shape, limits.max_virtual_tokens),
        )
    else:
        out = LoadedAdapter(kind, template=parse_template(config))
    return replace(out, load_time_s=time.perf_counter() - t0, files=source.digests())
