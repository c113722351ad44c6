"""What the registry knows of one adapter, and the public view of it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AdapterKind(str, enum.Enum):
    LORA = "lora"
    BOTTLENECK = "bottleneck"  # Houlsby / Pfeiffer
    PREFIX_TUNING = "prefix_tuning"
    PROMPT_TUNING = "prompt_tuning"
    PROMPT_TEMPLATE = "prompt_template"


BASE_KIND = "base"  # the label used for requests without an adapter


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: AdapterKind
    source: str  # the directory it was registered from
    num_params: int
    num_bytes: int
    ranks: dict[str, int]  # module -> rank (LoRA, bottleneck); virtual tokens for prefix/prompt
    residency: str  # "device", "host" or "disk"
    load_time_s: float | None  # last load from disk, seconds
    requests_served: int
    registered_at: float  # unix time
