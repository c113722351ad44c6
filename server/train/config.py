"""The training configuration: one frozen dataclass, validated once, saved next to the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METHODS = ("lora", "adapter", "prefix", "prompt")
# Adapters that touch the weights' outputs train at LoRA's usual rate; virtual tokens start far
# from anything the model has seen and need a much larger step.
DEFAULT_LR = {"lora": 2e-4, "adapter": 2e-4, "prefix": 3e-3, "prompt": 3e-2}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BOTTLENECK_ARCHITECTURES = ("houlsby", "pfeiffer")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Kept here so that the CLI can check flags without importing torch; the tests hold them equal to
# tasks.TASKS and adapters.bottleneck.ACTIVATIONS.
DEMO_TASKS = ("sentiment", "arithmetic", "format")
ACTIVATIONS = ("relu", "silu", "swish", "gelu")


@dataclass(frozen=True)
class TrainConfig:
    method: str  # lora | adapter (bottleneck) | prefix | prompt
    out: Path  # the adapter directory written at the end
    # --- data: a JSONL file, or a built-in demo task -----------------------------------------
    data: Path | None = None
    eval_data: Path | None = None  # None: hold out eval_split of `data`
    eval_split: float = 0.1  # fraction of `data` held out for validation
    demo: str | None = None  # sentiment | arithmetic | format (see tasks.py)
    demo_train: int = 200  # demo examples to train on
    demo_eval: int = 60  # held-out demo examples (validation loss and exact match)
    base: str = "default"  # "default" (SmolLM2-135M-Instruct) or a local HF model directory
    max_seq_len: int | None = None  # tokens per example; None: the model's context length
    # --- optimisation ------------------------------------------------------------------------
    epochs: int = 3
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR[method]
    batch_size: int = 8  # examples per step per process
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.1  # fraction of optimizer steps with a linear warmup, then linear decay
    weight_decay: float = 0.01  # AdamW, on weight matrices and embeddings (not biases)
    max_grad_norm: float = 1.0
    dropout: float = 0.05  # LoRA dropout / on the bottleneck's output; unused by prefix, prompt
    patience: int = 2  # epochs without a better validation loss before stopping
    seed: int = 0
    precision: str = "auto"  # auto: bf16 (fp16) autocast on CUDA, fp32 on CPU
    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = 8
    lora_alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # or ALL_LINEAR (`--targets all-linear`)
    # --- bottleneck adapter ------------------------------------------------------------------
    architecture: str = "pfeiffer"  # houlsby (after attention and MLP) | pfeiffer (after MLP)
    reduction_factor: int | None = None  # None: the preset's (16)
    non_linearity: str | None = None  # None: the preset's (houlsby swish, pfeiffer relu)
    scaling: float = 1.0
    # --- prefix / prompt tuning --------------------------------------------------------------
    num_virtual_tokens: int = 20
    # --- after training ----------------------------------------------------------------------
    score_demo: bool = True  # demo only: held-out exact match of the base model and the adapter
    register: str | None = None  # HOST:PORT of a running server to register the result with
    name: str | None = None  # the registered name; None: the output directory's name

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.data is None) == (self.demo is None):
            raise ValueError("give exactly one of --data FILE or --demo TASK")
        if self.demo is not None and self.demo not in DEMO_TASKS:
            raise ValueError(f"demo must be one of {', '.join(DEMO_TASKS)}, got {self.demo!r}")
        if self.demo is not None and self.eval_data is not None:
            raise ValueError("--eval is for --data; a demo task has its own held-out split")
        if not 0 < self.eval_split < 1:
            raise ValueError(f"eval_split must be in (0, 1), got {self.eval_split}")
        for name in ("epochs", "batch_size", "grad_accum", "lora_r", "num_virtual_tokens",
                     "demo_train", "demo_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0 or self.patience < 1:
            raise ValueError("weight_decay must be >= 0, max_grad_norm > 0 and patience >= 1")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if not self.targets or any(t not in ALL_LINEAR for t in self.targets):
            raise ValueError(f"LoRA targets must be among {', '.join(ALL_LINEAR)} "
                             f"(or all-linear), got {', '.join(self.targets) or 'none'}")
        if self.architecture not in BOTTLENECK_ARCHITECTURES:
            raise ValueError(f"architecture must be houlsby or pfeiffer, got {self.architecture!r}")
        if self.non_linearity is not None and self.non_linearity.lower() not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.non_linearity!r}")
        if self.reduction_factor is not None and self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.register is not None and ":" not in self.register:
            raise ValueError(f"--register wants HOST:PORT, got {self.register!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def adapter_name(self) -> str:
        return self.name or Path(self.out).resolve().name

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        out["learning_rate"] = self.learning_rate
        return out
