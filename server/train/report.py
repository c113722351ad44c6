"""What is written next to the adapter: `training_config.json`, `metrics.json`, `loss_curve.png`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftserve.train.loop import FitResult

CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "loss_curve.png"


def metrics_json(fit: FitResult, trainable_params: int, base_params: int,
                 extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "trainable_params": trainable_params,
        "base_params": base_params,
        "trainable_percent": 100.0 * trainable_params / base_params,
        "initial_eval_loss": fit.initial_eval_loss,
        "best_epoch": fit.best_epoch,
        "best_eval_loss": fit.best_eval_loss,
        "stopped_early": fit.stopped_early,
        "epochs": [{**asdict(e), "tokens_per_s": e.tokens_per_s} for e in fit.epochs],
        "step_losses": fit.step_losses,
        **extra,
    }


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def plot_loss_curve(fit: FitResult, path: Path, title: str) -> None:
    """Training loss per optimizer step and validation loss per epoch, on one step axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = range(1, len(fit.step_losses) + 1)
    ax.plot(steps, fit.step_losses, lw=1, alpha=0.8, label="train (per step)")
    per_epoch = len(fit.step_losses) / max(1, len(fit.epochs))
    ax.plot([0] + [round(e.epoch * per_epoch) for e in fit.epochs],
            [fit.initial_eval_loss] + [e.eval_loss for e in fit.epochs],
            "o-", label="validation (per epoch)")
    if fit.best_epoch:
        ax.axvline(round(fit.best_epoch * per_epoch), color="gray", ls="--", lw=0.8,
                   label=f"kept: epoch {fit.best_epoch}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
