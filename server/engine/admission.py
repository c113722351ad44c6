"""What the scheduler asks before admitting a sequence: are its adapter's weights ready?"""

from __future__ import annotations

import enum
from typing import Protocol

from peftserve.engine.sequence import Sequence


class Admission(enum.Enum):
    READY = "ready"
    WAIT = "wait"  # weights loading, or no slot / block free for them yet: others go first
    FAILED = "failed"  # the adapter cannot be loaded any more; `seq.error` says why


class AdmissionPolicy(Protocol):
    def admit(self, seq: Sequence) -> Admission: ...

    def on_preempt(self, seq: Sequence) -> None: ...

    def reclaim_blocks(self) -> bool: ...


class BaseOnly:
    """The policy of an engine without adapters."""

    def admit(self, seq: Sequence) -> Admission:
        return Admission.READY

    def on_preempt(self, seq: Sequence) -> None:
        return None

    def reclaim_blocks(self) -> bool:
        return False
