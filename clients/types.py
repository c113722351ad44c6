"""What the client returns: plain dataclasses, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """None = the server's default (greedy, 128 new tokens, no top-k/top-p/penalty)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    skip_special_tokens: bool | None = None


@dataclass(frozen=True)
class Timings:
    """Seconds, measured by the server from arrival at its engine."""

    queue_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    adapter_kind: str  # "base", "lora", ...


@dataclass(frozen=True)
class Chunk:
    """One piece of a stream: text and tokens new since the previous chunk."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # set on the last chunk only
    prompt_tokens: int | None  # last chunk only
    completion_tokens: int | None  # last chunk only
    timings: Timings | None  # first and last chunk
    adapter_kind: str


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "lora", "bottleneck", "prefix_tuning", "prompt_tuning", "prompt_template"
    source: str
    ranks: dict[str, int]
    num_params: int
    num_bytes: int
    residency: str  # "device", "host" or "disk"
    load_seconds: float | None
    requests_served: int
    registered_at: float  # unix time


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_model_len: int
    max_concurrent_streams: int
    max_waiting_requests: int
    max_inline_adapter_bytes: int
    max_num_seqs: int
    max_loras: int


@dataclass(frozen=True)
class Load:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    active_streams: int


@dataclass(frozen=True)
class ServerInfo:
    version: str
    model: str
    dtype: str
    device: str
    kernel_backend: str
    limits: Limits
    load: Load
    admin_token_required: bool
    adapter_root_configured: bool
