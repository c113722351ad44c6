"""What enters the engine (a `Request`) and what comes out of each step (`RequestOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import FinishReason
from peftserve.errors import InvalidRequest, shorten

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Request:
    """Exactly one of prompt, messages, prompt_token_ids."""

    request_id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None  # chat turns; the chat template is applied
    prompt_token_ids: tuple[int, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None or "": the base model
    # time.monotonic() when the request reached the server (the gRPC handler sets it), so that
    # queue time and TTFT count the wait before the engine thread takes the request; None: when
    # the engine takes it.
    arrival_time: float | None = None

    def __post_init__(self) -> None:
        for i, m in enumerate(self.messages or ()):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role is {shorten(role)}; it must be one of "
                                     f"{', '.join(CHAT_ROLES)}")
            if not isinstance(content, str) or not content:
                raise InvalidRequest(f"messages[{i}].content is empty")

    @property
    def num_chars(self) -> int:
        """Characters of prompt text (0 for token ids): bounds its tokens before tokenizing."""
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m.get("content") or "") for m in self.messages or ())


@dataclass(frozen=True)
class Timings:
    queue_s: float  # arrival -> first scheduled
    ttft_s: float | None  # arrival -> first token
    e2e_s: float | None  # arrival -> finished (None while running)


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    text: str  # text new since the previous output of this request
    token_ids: list[int]  # tokens new since the previous output
    logprobs: list[float] | None
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    timings: Timings | None = None  # set on the first and the final output
    adapter_kind: str = "base"  # AdapterKind value, or "base"
    error: str | None = None  # set when the request ended because of a server-side failure
