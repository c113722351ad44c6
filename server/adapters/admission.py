"""What the scheduler and the adapter manager agree on: the scheduler asks whether a sequence's
adapter is ready (the manager decides, and writes nothing to the device while it does); the
manager sees a sequence and the KV blocks through the two small protocols below, so this package
depends on no engine internals."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from peftserve.adapters.registry import AdapterEntry


class Admission(enum.Enum):
    READY = "ready"
    WAIT = "wait"  # weights loading, or no slot / block free for them yet: others go first
    FAILED = "failed"  # the adapter cannot be loaded any more; `seq.error` says why


class AdmittedSeq(Protocol):
    """The parts of an engine sequence the adapter manager reads and sets."""

    adapter: AdapterEntry | None
    token_ids: list[int]
    prefix_len: int  # leading tokens served from the adapter's shared KV blocks
    num_computed_tokens: int
    block_table: list[int]
    slot: int
    pinned: bool
    error: str | None


class BlockPool(Protocol):
    """The KV blocks, as a shared prefix holds them (by reference count)."""

    block_size: int

    def blocks_for(self, num_tokens: int) -> int: ...

    def can_allocate(self, num_blocks: int) -> bool: ...

    def take(self, num_blocks: int) -> list[int]: ...

    def share(self, blocks: list[int]) -> None: ...

    def release(self, blocks: list[int]) -> None: ...


class AdmissionPolicy(Protocol):
    def admit(self, seq: AdmittedSeq) -> Admission: ...

    def on_preempt(self, seq: AdmittedSeq) -> None: ...

    def reclaim_blocks(self) -> bool: ...


class BaseOnly:
    """The policy of an engine without adapters."""

    def admit(self, seq: AdmittedSeq) -> Admission:
        return Admission.READY

    def on_preempt(self, seq: AdmittedSeq) -> None:
        return None

    def reclaim_blocks(self) -> bool:
        return False
