"""Stand-ins for engine/cuda_graphs.DecodeGraphs where there is no CUDA (tests only):
EagerBuckets runs the bodies a DecodeGraphs would capture at each replay; EagerCapture is
DecodeGraphs itself (buckets, layouts, fallbacks) with each CUDA capture replaced by one run of
its body, run again at each replay."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import SimpleNamespace

from peftserve.adapters.slots import ModuleKey
from peftserve.engine.cuda_graphs import DecodeGraphs, default_sizes
from peftserve.engine.engine import Engine
from peftserve.engine.static_step import StaticDecodeStep


class EagerBuckets:
    """Pads a decode step's rows to the buckets DecodeGraphs would capture and runs the bodies
    it would capture (the forward with or without adapter deltas, then the sampler) eagerly at
    each replay, inside `around()` (e.g. a dispatch mode that watches their ops)."""

    def __init__(
        self, step: StaticDecodeStep, max_batch: int,
        around: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> None:  # fmt: skip
        self.step, self.sizes, self.around = step, default_sizes(max_batch), around
        self.replays = 0
        self.longest = 0  # the longest context a replay served

    @classmethod
    def install(
        cls, engine: Engine, max_batch: int,
        around: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> EagerBuckets:  # fmt: skip
        """Puts the engine's static decode step in the form its CUDA graphs capture: buckets
        up to `max_batch` (this object) and adapter deltas by per-token slot."""
        step = engine.runner.static
        assert step is not None, "the engine runs the classic decode step"
        step.token_slot_deltas = True
        step.graphs = buckets = cls(step, max_batch, around)
        return buckets

    def bucket(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def prepare(self, rows: int, adapters: frozenset[ModuleKey] | None) -> bool:
        """Nothing to capture: replay() runs the bodies eagerly."""
        return True

    def replay(self, rows: int, adapters: frozenset[ModuleKey] | None, full: bool) -> None:
        step = self.step
        lens = step.buffers.dev["context_lens"][:rows]
        self.longest = max(self.longest, int(lens.max()))
        with self.around():
            hook = None if adapters is None else step.hook(rows, None, adapters)
            step.forward(rows, step.options.graph_blocks, hook)
            step.sample_rows(rows, full, full)
        self.replays += 1


class EagerCapture(DecodeGraphs):
    """DecodeGraphs whose capture of a body runs it once (`capturing` set meanwhile: an op a
    test makes fail only then is one a CUDA graph cannot hold) and whose replay runs it again."""

    capturing = False

    @classmethod
    def install(cls, engine: Engine, max_batch: int) -> EagerCapture:
        """The engine's static decode step with these graphs, captured as at start-up."""
        step = engine.runner.static
        assert step is not None, "the engine runs the classic decode step"
        step.token_slot_deltas = True
        graphs = cls(step, default_sizes(max_batch))
        graphs.capture()
        step.graphs = graphs
        return graphs

    def _record(self, body: Callable[[], None]) -> SimpleNamespace:
        self.capturing = True
        try:
            body()
        finally:
            self.capturing = False
        return SimpleNamespace(replay=body)
