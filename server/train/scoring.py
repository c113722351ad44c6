"""Held-out exact match of a demo task, served by peftserve's own engine: the base model and the
trained adapter directory, registered exactly as a server would load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.train.tasks import DemoTask, Item


@dataclass(frozen=True)
class Score:
    correct: int
    total: int
    outputs: list[str]  # the generated replies, in item order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def make_engine(model_dir: Path, max_rank: int = 64, max_virtual_tokens: int = 256) -> Engine:
    return Engine.from_config(EngineConfig(
        model=str(model_dir), dtype="float32", max_lora_rank=max(64, max_rank),
        max_virtual_tokens=max(256, max_virtual_tokens)))


def exact_match(engine: Engine, task: DemoTask, items: list[Item],
                adapter: str | None = None) -> Score:
    """Greedy replies to each held-out item's conversation (system + user), scored."""
    params = SamplingParams(max_new_tokens=task.max_new_tokens)
    requests = [Request(f"{i}", messages=tuple(task.messages(item, with_answer=False)),
                        params=params, adapter=adapter) for i, item in enumerate(items)]
    results = engine.generate(requests)
    outputs = ["".join(o.text for o in results[r.request_id]) for r in requests]
    correct = sum(task.score(out, item.target) for out, item in zip(outputs, items, strict=True))
    return Score(correct, len(items), outputs)
