"""`train(config)`: config -> data -> model -> loop -> save (-> score a demo, -> register)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

from peftserve.models.loader import load_config, load_tokenizer, resolve_model_dir
from peftserve.train import data, methods, report, scoring
from peftserve.train.config import TrainConfig
from peftserve.train.loop import FitResult, fit, make_accelerator
from peftserve.train.register import register
from peftserve.train.tasks import Item, get_task


@dataclass(frozen=True)
class TrainResult:
    out: Path
    fit: FitResult
    trainable_params: int
    base_params: int
    seconds: float  # data + model + loop + save, not demo scoring
    demo_accuracy: dict[str, Any] | None = None  # {"before", "after", "n"}
    registered: str | None = None


def train(config: TrainConfig, admin_token: str | None = None) -> TrainResult:
    t0 = time.perf_counter()
    accelerator = make_accelerator(config)
    set_seed(config.seed)

    # --- base model and tokenizer ---------------------------------------------------------
    model_dir = resolve_model_dir(config.base)
    hf_config = load_config(model_dir)  # refuses architectures the server cannot serve
    tokenizer = load_tokenizer(model_dir)
    max_len = min(config.max_seq_len or hf_config.max_position_embeddings,
                  hf_config.max_position_embeddings)

    # --- data -----------------------------------------------------------------------------
    held_out: list[Item] = []
    if config.demo is not None:
        task = get_task(config.demo)
        train_items, held_out = task.split(config.demo_train, config.demo_eval, config.seed)
        train_set = data.encode(task.records(train_items, "train"), tokenizer, max_len)
        valid_set = data.encode(task.records(held_out, "eval"), tokenizer, max_len)
    else:
        assert config.data is not None
        train_set = data.encode(data.read_jsonl(config.data), tokenizer, max_len)
        if config.eval_data is not None:
            valid_set = data.encode(data.read_jsonl(config.eval_data), tokenizer, max_len)
        else:
            train_set, valid_set = data.split(train_set, config.eval_split, config.seed)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id

    # --- model ----------------------------------------------------------------------------
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = methods.build(config, base)
    if accelerator.is_main_process:
        print(f"{config.method}: {adapted.trainable_params:,} trainable parameters "
              f"({100 * adapted.trainable_params / adapted.base_params:.3f}% of "
              f"{adapted.base_params:,}); {len(train_set)} train / {len(valid_set)} validation "
              f"examples; lr {config.learning_rate:g}", flush=True)

    # --- loop -----------------------------------------------------------------------------
    result = fit(accelerator, adapted.model, train_set, valid_set, config, pad_id,
                 adapted.input_offset)

    # --- save -----------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    out = Path(config.out)
    seconds = time.perf_counter() - t0
    if not accelerator.is_main_process:
        return TrainResult(out, result, adapted.trainable_params, adapted.base_params, seconds)
    adapted.save(out)
    demo_accuracy = None
    if config.demo is not None and config.score_demo:
        demo_accuracy = _score_demo(config, model_dir, out, held_out, hf_config.hidden_size)
    extra: dict[str, Any] = {"train_seconds": seconds, "train_examples": len(train_set),
                             "eval_examples": len(valid_set)}
    if demo_accuracy is not None:
        extra["demo_accuracy"] = demo_accuracy
    report.write_json(out / report.METRICS_FILE, report.metrics_json(
        result, adapted.trainable_params, adapted.base_params, extra))
    report.write_json(out / report.CONFIG_FILE, {
        **config.to_json(), "base_dir": str(model_dir), "max_seq_len_used": max_len,
        "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "torch": torch.__version__})
    report.plot_loss_curve(result, out / report.CURVE_FILE,
                           f"{config.method} on {config.demo or Path(str(config.data)).name}")
    print(f"saved {out} (best epoch {result.best_epoch}, validation loss "
          f"{result.initial_eval_loss:.4f} -> {result.best_eval_loss:.4f})", flush=True)
    registered = None
    if config.register is not None:
        registered = register(config.register, config.adapter_name, out, admin_token)
        print(registered, flush=True)
    return TrainResult(out, result, adapted.trainable_params, adapted.base_params, seconds,
                       demo_accuracy, registered)


def _score_demo(config: TrainConfig, model_dir: Path, out: Path, held_out: list[Item],
                hidden: int) -> dict[str, Any]:
    assert config.demo is not None
    task = get_task(config.demo)
    engine = scoring.make_engine(model_dir, max_rank=_max_rank(config, hidden),
                                 max_virtual_tokens=config.num_virtual_tokens)
    engine.adapters.register("trained", out)
    before = scoring.exact_match(engine, task, held_out)
    after = scoring.exact_match(engine, task, held_out, adapter="trained")
    print(f"{task.name} held-out exact match: base {before.accuracy:.1%} -> "
          f"{config.method} {after.accuracy:.1%} ({after.total} items)", flush=True)
    return {"before": before.accuracy, "after": after.accuracy, "n": after.total,
            "examples": [{"target": str(i.target), "before": b, "after": a} for i, b, a in
                         zip(held_out[:5], before.outputs, after.outputs, strict=False)]}


def _max_rank(config: TrainConfig, hidden: int) -> int:
    if config.method == "adapter":
        return hidden // (config.reduction_factor or 16)
    return config.lora_r
