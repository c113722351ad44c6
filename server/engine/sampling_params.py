"""Per-request sampling parameters, validated where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftserve.errors import InvalidRequest

# Beyond these the distribution is flat (or a token is all but banned) to float precision: a
# larger value can only be a mistake, and inf turns logits into NaN.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; as transformers applies it (prompt + output)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, excluded from the output text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # log-probability of each chosen token under the model's distribution
    skip_special_tokens: bool = True
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also catches NaN and inf
            raise InvalidRequest(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequest(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}"
            )
        if not math.isfinite(self.top_p):
            raise InvalidRequest(f"top_p must be finite, got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """The token is the argmax of the raw logits, and nothing else of them is returned."""
        return self.temperature == 0 and self.repetition_penalty == 1.0 and not self.logprobs
