"""Early stopping keeps the best weights; gradient accumulation; the CLI's config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftserve.train.config import TrainConfig
from peftserve.train.data import IGNORE, Example
from peftserve.train.loop import EarlyStopping, fit, make_accelerator
from tests.train.conftest import run_train


def test_early_stopping_tracks_the_best_and_its_patience():
    stop = EarlyStopping(initial=2.0, patience=2)
    assert stop.update(1.5) and not stop.should_stop
    assert not stop.update(1.6) and not stop.should_stop
    assert stop.update(1.4) and stop.best == 1.4
    assert not stop.update(1.4)  # equal is not better
    assert not stop.update(1.9) and stop.should_stop


class _OneWeight(nn.Module):
    """A two-token "LM" with one weight w (starting at 0). The logit of token 1 after an input
    whose first token is t: w (t=1: training pulls w up), -w (t=2: a loss that only grows with
    w), -(w - 0.5)^2 (t=3: a loss smallest at w = 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, logits_to_keep):  # [B, T], [B, T], [K]
        w = self.w
        one = {1: w, 2: -w, 3: -(w - 0.5) ** 2}
        rows = [torch.stack([torch.zeros(()), one[int(t)]]) for t in input_ids[:, 0]]
        logits = torch.stack(rows)[:, None, :].expand(-1, len(logits_to_keep), -1)
        return SimpleNamespace(logits=logits)  # [B, K, 2]


def _fit(valid_token: int, epochs: int, patience: int):
    config = TrainConfig(method="lora", data=Path("unused.jsonl"), out=Path("unused"), lr=0.15,
                         epochs=epochs, patience=patience, batch_size=2, warmup_ratio=0.0,
                         weight_decay=0.0)
    model = _OneWeight()
    train = [Example("t", [1, 1], [IGNORE, 1])] * 4
    valid = [Example("v", [valid_token, 1], [IGNORE, 1])]
    return model, fit(make_accelerator(config), model, train, valid, config, pad_id=0)


def test_validation_that_only_worsens_stops_early_and_keeps_the_initial_weights():
    model, result = _fit(valid_token=2, epochs=6, patience=2)
    assert result.initial_eval_loss == pytest.approx(math.log(2))
    assert result.stopped_early and len(result.epochs) == 2 and result.best_epoch == 0
    assert all(e.eval_loss > result.initial_eval_loss for e in result.epochs)
    assert model.w.detach().item() == 0.0


def test_the_best_epoch_is_kept_not_the_last():
    model, result = _fit(valid_token=3, epochs=6, patience=10)  # w passes 0.5 on its way up
    losses = [e.eval_loss for e in result.epochs]
    assert len(losses) == 6 and not result.stopped_early
    assert 1 <= result.best_epoch < 6 and losses[-1] > min(losses)
    assert result.best_eval_loss == min(losses)
    w = model.w.detach().item()
    assert math.log1p(math.exp((w - 0.5) ** 2)) == pytest.approx(min(losses))
    assert len(result.step_losses) == 12  # 2 optimizer steps per epoch


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_train_dir, toy_data):
    out = tmp_path / "accum"
    rc = run_train("--method", "prompt", "--data", str(toy_data["train"]), "--eval-split",
                   "0.25", "--out", str(out), "--base", str(tiny_train_dir), "--epochs", "1",
                   "--batch-size", "4", "--grad-accum", "3", "--num-virtual-tokens", "2")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 36 and metrics["eval_examples"] == 12
    assert len(metrics["step_losses"]) == 3  # 36 examples / (4 x 3)


@pytest.mark.parametrize("args, message", [
    (["--targets", "q_proj,lm_head"], "LoRA targets must be among"),
    (["--eval-split", "1.5"], "eval_split must be in (0, 1)"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--register", "localhost"], "--register wants HOST:PORT"),
    (["--non-linearity", "tanh"], "non_linearity must be one of relu, silu, swish, gelu"),
])
def test_config_errors_exit_2_with_a_message(tmp_path, capsys, args, message):
    rc = run_train("--method", "lora", "--data", str(tmp_path / "x.jsonl"), "--out",
                   str(tmp_path / "out"), *args)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_data_and_demo_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_train("--method", "lora", "--data", "x.jsonl", "--demo", "sentiment")
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
