"""`peftserve train --demo sentiment` on SmolLM2-135M-Instruct for every method: held-out exact
match of the base model and of the trained adapter (served by peftserve's engine), trainable
parameters, wall time. Writes bench/results/train_sentiment.json.

    .venv/bin/python -m bench.train_sentiment                       # lora, adapter, prefix, prompt
    .venv/bin/python -m bench.train_sentiment --methods lora,prompt --out-dir /tmp/runs

Every run uses `peftserve train`'s defaults (200 train / 60 held-out items, 3 epochs, batch 8,
the method's default learning rate, fp32 on CPU). Wall times are of one process on whatever the
machine is doing: record the load average next to them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import environment
from peftserve.train.config import METHODS, TrainConfig
from peftserve.train.run import train

RESULT = Path(__file__).parent / "results" / "train_sentiment.json"


def run_method(method: str, out_dir: Path) -> dict[str, object]:
    config = TrainConfig(method=method, demo="sentiment", out=out_dir / method)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - t0
    assert result.demo_accuracy is not None
    fit = result.fit
    return {
        "method": method,
        "learning_rate": config.learning_rate,
        "trainable_params": result.trainable_params,
        "trainable_percent_of_base": round(100 * result.trainable_params / result.base_params, 4),
        "base_params": result.base_params,
        "accuracy_before": result.demo_accuracy["before"],
        "accuracy_after": result.demo_accuracy["after"],
        "held_out_items": result.demo_accuracy["n"],
        "initial_eval_loss": round(fit.initial_eval_loss, 4),
        "best_eval_loss": round(fit.best_eval_loss, 4),
        "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.epochs),
        "train_wall_s": round(result.seconds, 1),
        "total_wall_s": round(wall, 1),  # + scoring base and adapter on the held-out items
        "train_tokens_per_s": [round(e.tokens_per_s, 1) for e in fit.epochs],
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "examples": result.demo_accuracy["examples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the adapters go (default: a temporary directory)")
    parser.add_argument("--result", type=Path, default=RESULT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="train-sentiment-"))
    runs = []
    for method in args.methods.split(","):
        runs.append(run_method(method, out_dir))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "examples"}), flush=True)
        gc.collect()
    report = {
        "benchmark": "peftserve train --demo sentiment, SmolLM2-135M-Instruct, CPU fp32",
        "note": "2-core machine shared with other engineers' jobs during the runs: wall times "
                "and tokens/s are noisy (see load_average_1m, before and after each run); "
                "accuracies and parameter counts are exact. accuracy_before is the base model "
                "without an adapter on the same held-out items.",
        "environment": environment(),
        "runs": runs,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
