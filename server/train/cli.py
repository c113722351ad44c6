"""The `peftserve train` subcommand (also `python -m peftserve.train`). Flags map one to one onto
`TrainConfig` fields (dashes -> underscores); an omitted flag keeps the field's default."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from peftserve.serve_config import ADMIN_TOKEN_ENV
from peftserve.train.config import (
    ALL_LINEAR,
    BOTTLENECK_ARCHITECTURES,
    DEFAULT_LR,
    DEMO_TASKS,
    METHODS,
    PRECISIONS,
    TrainConfig,
)

DESCRIPTION = """\
Fine-tune an adapter on a frozen base model and write a directory that `peftserve serve` loads
(RegisterAdapter), with training_config.json, metrics.json and loss_curve.png beside it.

examples:
  peftserve train --method lora --data train.jsonl --eval-split 0.1 --out adapters/mytask
  peftserve train --method adapter --architecture houlsby --data train.jsonl --eval eval.jsonl \\
      --out adapters/mytask-bn --register 127.0.0.1:50051 --name mytask
  peftserve train --demo sentiment --method prompt
  accelerate launch --multi_gpu -m peftserve.train --method lora --data train.jsonl --out DIR
"""


# (flag, type, help); the help gets the TrainConfig default appended.
_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("--base", str, "'default' (SmolLM2-135M-Instruct) or a local Hugging Face model directory"),
    ("--max-seq-len", int, "longest example in tokens (unset: the model's context length)"),
    ("--epochs", int, "passes over the training data"),
    ("--batch-size", int, "examples per step per process"),
    ("--grad-accum", int, "micro-batches per optimizer step"),
    ("--warmup-ratio", float, "fraction of steps with a linear warmup (then linear decay)"),
    ("--weight-decay", float, "AdamW weight decay (not on biases)"),
    ("--max-grad-norm", float, "gradient clipping"),
    ("--dropout", float, "LoRA dropout / dropout on the bottleneck's output"),
    ("--patience", int, "epochs without a better validation loss before stopping early"),
    ("--seed", int, "data order, initialisation, the validation split"),
    ("--lora-r", int, "LoRA rank"),
    ("--lora-alpha", float, "LoRA alpha (scale alpha / r)"),
    ("--reduction-factor", int, "bottleneck size = hidden / this (unset: the preset's, 16)"),
    ("--non-linearity", str, "bottleneck activation relu|swish|silu|gelu (unset: the preset's)"),
    ("--scaling", float, "bottleneck output scaling"),
    ("--num-virtual-tokens", int, "prefix / prompt tuning virtual tokens"),
    ("--demo-train", int, "demo: training examples generated"),
    ("--demo-eval", int, "demo: held-out examples generated"),
)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `train` on the `peftserve` command's subparsers."""
    parser = subparsers.add_parser(
        "train", help="fine-tune an adapter (LoRA, bottleneck, prefix or prompt tuning)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="lora | adapter (bottleneck) | prefix | prompt; default learning "
                             "rates " + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="JSONL: {prompt, completion} or {messages} lines")
    source.add_argument("--demo", choices=DEMO_TASKS,
                        help="a built-in task generated in code, scored by exact match")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--eval", dest="eval_data", type=Path, help="validation JSONL")
    held.add_argument("--eval-split", type=float,
                      help=f"fraction of --data held out (default {defaults['eval_split']})")
    parser.add_argument("--out", type=Path,
                        help="adapter directory to write (default with --demo: "
                             "./peftserve-DEMO-METHOD)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: by method)")
    for flag, kind, text in _FLAGS:
        default = defaults[flag[2:].replace("-", "_")]
        shown = f" (default {default})" if default is not None else ""
        parser.add_argument(flag, type=kind, help=text + shown)
    parser.add_argument("--targets", help="LoRA target modules, comma-separated, or all-linear "
                                          f"(default {','.join(defaults['targets'])})")
    parser.add_argument("--architecture", choices=BOTTLENECK_ARCHITECTURES,
                        help=f"bottleneck preset (default {defaults['architecture']})")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="auto: bf16 (fp16) autocast on CUDA, fp32 on CPU")
    parser.add_argument("--no-score", dest="score_demo", action="store_false", default=None,
                        help="demo: skip the held-out exact-match scoring")
    parser.add_argument("--register", metavar="HOST:PORT",
                        help="when done, register the adapter with this running server "
                             "(replacing one of the same name)")
    parser.add_argument("--name", help="the registered name (default: the output directory's)")
    parser.add_argument("--admin-token-file", type=Path,
                        help=f"file holding the server's admin token (else ${ADMIN_TOKEN_ENV})")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if isinstance(values.get("targets"), str):
        text = values["targets"]
        values["targets"] = ALL_LINEAR if text == "all-linear" else tuple(
            t.strip() for t in text.split(",") if t.strip())
    if "out" not in values and args.demo is not None:
        values["out"] = Path(f"peftserve-{args.demo}-{args.method}")
    if "out" not in values:
        raise ValueError("--out DIR is required with --data")
    return TrainConfig(**values)


def _admin_token(args: argparse.Namespace) -> str | None:
    if args.admin_token_file is not None:
        return Path(args.admin_token_file).read_text().strip()
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    # PEFT's prefix tuning passes `past_key_values`, which transformers 5 deprecates.
    warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)
    from peftserve.errors import UnsupportedModel
    from peftserve.train.data import DataError
    from peftserve.train.register import RegisterError
    from peftserve.train.run import train

    try:
        config = config_from_args(args)
        token = _admin_token(args) if config.register else None
    except (ValueError, OSError) as e:
        print(f"peftserve train: {e}", file=sys.stderr)
        return 2
    try:
        train(config, admin_token=token)
    except (DataError, UnsupportedModel) as e:
        print(f"peftserve train: {e}", file=sys.stderr)
        return 2
    except RegisterError as e:
        print(f"peftserve train: {e} (the adapter is saved in {config.out})", file=sys.stderr)
        return 1
    return 0
