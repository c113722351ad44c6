"""The training loop: AdamW, linear warmup then linear decay, gradient accumulation, validation
loss after every epoch, early stopping that keeps the best weights. Runs under
`accelerate.Accelerator`: one CPU process by default, DDP under `accelerate launch` or
`torchrun`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftserve.train.config import TrainConfig
from peftserve.train.data import IGNORE, Example, collate


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float  # mean over the epoch's optimizer steps
    eval_loss: float  # per target token, over the whole validation set
    learning_rate: float  # at the epoch's end
    tokens: int  # non-padding tokens seen in the epoch (all processes)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FitResult:
    initial_eval_loss: float
    epochs: list[EpochMetrics] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step
    best_epoch: int = 0  # 0: training never beat the initial weights (they are kept)
    stopped_early: bool = False

    @property
    def best_eval_loss(self) -> float:
        if self.best_epoch == 0:
            return self.initial_eval_loss
        return self.epochs[self.best_epoch - 1].eval_loss


class EarlyStopping:
    """Tracks the best validation loss; `should_stop` after `patience` epochs without a better
    one."""

    def __init__(self, initial: float, patience: int) -> None:
        self.best = initial
        self.patience = patience
        self.bad_epochs = 0

    def update(self, loss: float) -> bool:
        """True when `loss` is the best so far."""
        if loss < self.best:
            self.best, self.bad_epochs = loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def make_accelerator(config: TrainConfig) -> Accelerator:
    if config.precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "no"
    else:
        precision = "no" if config.precision == "fp32" else config.precision
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum,
                       cpu=not torch.cuda.is_available())


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of the target tokens, their count). The vocabulary projection runs
    only at positions followed by a target in some row: most of a prompt needs no logits, and the
    LM head is ~20% of a small model's compute. `offset`: positions the adapter puts in front of
    the input (prompt tuning's virtual tokens)."""
    labels = batch["labels"][:, 1:]  # [B, T-1]: the token predicted at each position
    keep = (labels != IGNORE).any(dim=0).nonzero().squeeze(1)  # [K]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep + offset).logits  # [B, K, vocab]
    targets = labels[:, keep]  # [B, K]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (targets != IGNORE).sum()


def fit(accelerator: Accelerator, model: nn.Module, train: list[Example], valid: list[Example],
        config: TrainConfig, pad_id: int, offset: int = 0) -> FitResult:
    """Trains `model`'s trainable parameters and leaves the best epoch's values in them.
    `offset`: see `target_loss`."""
    torch.manual_seed(config.seed)
    make_batch = partial(collate, pad_id=pad_id)
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=True,
                              collate_fn=make_batch,
                              generator=torch.Generator().manual_seed(config.seed))
    valid_loader = DataLoader(valid, batch_size=config.batch_size, collate_fn=make_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ], lr=config.learning_rate)
    model, optimizer, train_loader, valid_loader = accelerator.prepare(
        model, optimizer, train_loader, valid_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    # Not prepared: stepped once per optimizer step, whatever the process count.
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total_steps), total_steps)

    result = FitResult(initial_eval_loss=evaluate(accelerator, model, valid_loader, offset))
    stopper = EarlyStopping(result.initial_eval_loss, config.patience)
    best_state = _trainable_state(accelerator, model)
    bar = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, unit="step",
               dynamic_ncols=True)
    for epoch in range(1, config.epochs + 1):
        bar.set_description(f"{config.method} epoch {epoch}/{config.epochs}")
        t0, tokens, step_loss, micro = time.perf_counter(), 0, 0.0, 0
        epoch_losses: list[float] = []
        model.train()
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss_sum, n = target_loss(model, batch, offset)
                loss = loss_sum / n.clamp(min=1)  # mean per target token
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            tokens += int(accelerator.reduce(batch["attention_mask"].sum(), "sum"))
            step_loss += float(accelerator.reduce(loss.detach().float(), "mean"))
            micro += 1
            if accelerator.sync_gradients:
                scheduler.step()
                epoch_losses.append(step_loss / micro)
                step_loss, micro = 0.0, 0
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        eval_loss = evaluate(accelerator, model, valid_loader, offset)
        result.step_losses += epoch_losses
        result.epochs.append(EpochMetrics(
            epoch, sum(epoch_losses) / max(1, len(epoch_losses)), eval_loss,
            scheduler.get_last_lr()[0], tokens, time.perf_counter() - t0))
        bar.write(f"epoch {epoch}: train loss {result.epochs[-1].train_loss:.4f}, "
                  f"validation loss {eval_loss:.4f}")
        if stopper.update(eval_loss):
            result.best_epoch = epoch
            best_state = _trainable_state(accelerator, model)
        elif stopper.should_stop and epoch < config.epochs:
            result.stopped_early = True
            bar.write(f"stopping early: no better validation loss for {config.patience} epochs")
            break
    bar.close()
    _load_trainable_state(accelerator, model, best_state)
    return result


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader,
             offset: int = 0) -> float:
    """Mean loss per target token over the whole loader (all processes)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # [loss sum, target tokens]
    for batch in loader:
        loss_sum, n = target_loss(model, batch, offset)
        total += torch.stack([loss_sum.float(), n.float()])
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


def _trainable_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    inner = accelerator.unwrap_model(model)
    return {n: p.detach().to("cpu", copy=True) for n, p in inner.named_parameters()
            if p.requires_grad}


def _load_trainable_state(accelerator: Accelerator, model: nn.Module,
                          state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in accelerator.unwrap_model(model).named_parameters():
            if name in state:
                p.copy_(state[name])
