"""A snapshot of the engine for metrics and introspection, taken on the engine thread."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    batch_size: int  # sequences in the last step
    batch_tokens: int  # tokens in the last step
    kv_blocks_used: int
    kv_blocks_total: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_loras: int
    adapters_resident: dict[str, int] = field(default_factory=dict)  # tier -> count
    adapter_loads: int = 0
    adapter_load_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    steps: int = 0  # steps run
    steps_ahead: int = 0  # of them, decode steps queued before the last one's tokens were back
    ahead_rows_dropped: int = 0  # rows of those whose sequence had ended meanwhile


@dataclass(frozen=True)
class EngineInfo:
    """What ServerInfo reports of an engine: its model, backend and limits, and its load."""

    model: str  # EngineConfig.model as given ("default", or a directory)
    dtype: str
    device: str
    kernel_backend: str
    max_model_len: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_waiting: int
    max_num_seqs: int
    stats: EngineStats
