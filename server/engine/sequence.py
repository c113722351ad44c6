"""One request's sequence: its tokens, how many have K/V in the cache, its block table."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from peftserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from peftserve.adapters.registry import AdapterEntry


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context
    ABORT = "abort"  # cancelled by the client or the server


# eq=False: a sequence is itself, compared by identity. Compared field by field (the token
# lists included), every `seq in list` of the scheduler cost microseconds, a step's cost
# growing with the square of its batch (bench/host_step.py, bench/README).
@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # KV blocks in order; only appended to, or replaced by another list (step_buffers.
    # BlockTableRows mirrors it on those terms)
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    generator: torch.Generator | None = None
    output_logprobs: list[float] = field(default_factory=list)
    adapter: AdapterEntry | None = None  # None for the base model
    prefix_len: int = 0  # leading tokens served from the adapter's shared KV blocks
    num_virtual: int = 0  # leading placeholder tokens that are not real (prefix/prompt tuning)
    slot: int = -1  # device slot of a LoRA / bottleneck adapter while running
    pinned: bool = False  # counted in its adapter's running sequences (slot / prefix pinned)
    error: str | None = None  # why the request failed, when it did

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens as the user counts them (virtual tokens excluded)."""
        return len(self.prompt_token_ids) - self.num_virtual

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

