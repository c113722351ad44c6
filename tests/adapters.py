"""Adapters of every kind for tests, built with PEFT (or in peftserve's own formats)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from peftserve.adapters.bottleneck import PRESETS, BottleneckModule

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_lora(
    model_dir: Path,
    out: Path,
    r: int = 8,
    alpha: float = 16,
    targets: list[str] | None = None,
    seed: int = 0,
    **kw,
) -> Path:
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or ["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        **kw,
    )
    model = get_peft_model(base_model(model_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # PEFT starts B at zero: the adapter would change nothing
    model.save_pretrained(out)
    return out


def make_prefix_tuning(model_dir: Path, out: Path, virtual: int = 5, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        base_model(model_dir), PrefixTuningConfig(num_virtual_tokens=virtual, task_type="CAUSAL_LM")
    )
    model.save_pretrained(out)
    return out


def make_prompt_tuning(model_dir: Path, out: Path, virtual: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        base_model(model_dir), PromptTuningConfig(num_virtual_tokens=virtual, task_type="CAUSAL_LM")
    )
    model.save_pretrained(out)
    return out


def peft_model(model_dir: Path, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(base_model(model_dir), adapter_dir).eval()


def make_bottleneck(
    model_dir: Path,
    out: Path,
    architecture: str = "houlsby",
    reduction_factor: int = 16,
    scaling: float = 1.0,
    seed: int = 0,
    **overrides,
) -> Path:
    """peftserve's bottleneck format with random (non-zero) weights."""
    hf = AutoConfig.from_pretrained(model_dir)
    cfg = {
        **PRESETS[architecture],
        "reduction_factor": reduction_factor,
        "scaling": scaling,
        **overrides,
    }
    r = hf.hidden_size // cfg["reduction_factor"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf.num_hidden_layers):
        for placement in ("mh_adapter", "output_adapter"):
            if not cfg[placement]:
                continue
            p = f"layers.{layer}.{placement}"
            tensors[f"{p}.down.weight"] = torch.randn(r, hf.hidden_size, generator=g) * 0.2
            tensors[f"{p}.down.bias"] = torch.randn(r, generator=g) * 0.1
            tensors[f"{p}.up.weight"] = torch.randn(hf.hidden_size, r, generator=g) * 0.2
            tensors[f"{p}.up.bias"] = torch.randn(hf.hidden_size, generator=g) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps({"peftserve_type": "BOTTLENECK", "architecture": architecture, **cfg})
    )
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def bottleneck_reference(model_dir: Path, adapter_dir: Path):
    """transformers' model with the bottleneck modules injected by forward hooks on o_proj
    (mh_adapter) and down_proj (output_adapter): the plain-torch reference."""
    from safetensors.torch import load_file

    model = base_model(model_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg = {**PRESETS.get(cfg.get("architecture"), {}), **cfg}
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    hidden = model.config.hidden_size
    r = hidden // cfg["reduction_factor"]
    for i, layer in enumerate(model.model.layers):
        for placement, target in (
            ("mh_adapter", layer.self_attn.o_proj),
            ("output_adapter", layer.mlp.down_proj),
        ):
            if not cfg[placement]:
                continue
            mod = BottleneckModule(hidden, r, cfg["non_linearity"], cfg["scaling"])
            p = f"layers.{i}.{placement}"
            mod.down.weight.data, mod.down.bias.data = (
                tensors[f"{p}.down.weight"],
                tensors[f"{p}.down.bias"],
            )
            mod.up.weight.data, mod.up.bias.data = (
                tensors[f"{p}.up.weight"],
                tensors[f"{p}.up.bias"],
            )
            target.register_forward_hook(lambda _m, _i, out, mod=mod: mod(out))
    return model


def make_template(
    out: Path,
    system: str | None = "You answer briefly.",
    few_shot: list[dict[str, str]] | None = None,
    chain_of_thought: str | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peftserve_type": "PROMPT_TEMPLATE",
        "system": system,
        "few_shot": few_shot if few_shot is not None else [{"user": "2 + 2", "assistant": "4"}],
        "chain_of_thought": chain_of_thought,
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


# One adapter of each kind (and two LoRA and bottleneck variants), as the batching tests mix them.
EVERY_KIND = ("lora", "lora-qv", "bottleneck", "pfeiffer", "prefix", "prompt", "template")


def every_kind(model_dir: Path, root: Path, names: tuple[str, ...] = EVERY_KIND) -> dict[str, Path]:
    """The adapters `names` (from EVERY_KIND) for `model_dir`, written under `root`."""
    makers = {
        "lora": lambda: make_lora(model_dir, root / "lora", r=8, seed=1, targets=ALL_LINEAR),
        "lora-qv": lambda: make_lora(model_dir, root / "qv", r=4, seed=5,
                                     targets=["q_proj", "v_proj"]),
        "bottleneck": lambda: make_bottleneck(model_dir, root / "bottleneck", "houlsby", seed=2),
        "pfeiffer": lambda: make_bottleneck(model_dir, root / "pfeiffer", "pfeiffer", seed=6),
        "prefix": lambda: make_prefix_tuning(model_dir, root / "prefix", virtual=5, seed=3),
        "prompt": lambda: make_prompt_tuning(model_dir, root / "prompt", virtual=3, seed=4),
        "template": lambda: make_template(root / "template", system="Be brief.",
                                          few_shot=[{"user": "hi", "assistant": "hello"}]),
    }  # fmt: skip
    return {name: makers[name]() for name in names}
