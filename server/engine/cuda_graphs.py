"""CUDA graphs of the static decode step, one per batch-size bucket, captured at start-up.

Per bucket (rows padded up to it with the dummy sequence) there are three graphs over one shared
memory pool: the forward (all layers and the LM head) without adapter deltas, the sampler for
all-greedy rows (argmax + logprobs), and the sampler with draws and repetition penalties. The
forward with adapter deltas is captured per bucket on first use, with a TokenSlotHook over the
slot buffers allocated by then; the deltas read the per-token slot index from the step's buffer
and the weights from the fixed slot buffers, so registering, loading or evicting an adapter
never invalidates it. It is captured per set of modules the step's adapters have deltas on
(DeviceSlots.modules_of), up to MODULE_SETS sets a layout, then over every allocated module: a
step of q,v LoRAs beside resident all-linear ones does not run the o / gate_up / down kernels,
each a graph node of a few microseconds that would add zeros for its rows. Only the first
adapter to target a module not yet allocated (a new (layer, projection) buffer set, or a
bottleneck activation not seen before) changes the buffers' layout; the adapter forwards are
then captured again, once, and the time logged.

What cannot be captured degrades only itself, logged once: a sampler that fails to capture
runs eagerly after each replayed forward, and an adapter forward that fails leaves the steps
with adapter deltas eager while the base steps keep replaying. Only a base forward that fails
to capture leaves the engine without graphs (model_runner.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from peftserve.adapters.slots import ModuleKey
from peftserve.adapters.token_slot_hook import layout_key
from peftserve.engine.static_step import StaticDecodeStep

log = logging.getLogger(__name__)

WARMUP_RUNS = 2  # eager runs before a capture: lazy initialisation, autotuning, allocator
MODULE_SETS = 4  # adapter forwards per bucket limited to their modules; others take ALL
ALL = "all"  # the key of the adapter forward over every allocated module

Modules = frozenset[ModuleKey] | str  # a set of modules an adapter forward covers, or ALL


def default_sizes(max_batch: int) -> tuple[int, ...]:
    """The buckets up to `max_batch`: 1, 2, 4, 8, then every 16 (and `max_batch` itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += range(16, max_batch + 1, 16)
    return tuple(sorted({*sizes, max_batch}))


class DecodeGraphs:
    def __init__(self, step: StaticDecodeStep, sizes: tuple[int, ...]) -> None:
        if not sizes or min(sizes) < 1 or max(sizes) > step.options.max_rows:
            raise ValueError(f"graph batch sizes must be in 1..{step.options.max_rows}: {sizes}")
        self.step = step
        self.sizes = tuple(sorted(sizes))
        self.pool = None  # the graphs' shared memory pool, made at the first capture
        self.base: dict[int, torch.cuda.CUDAGraph] = {}
        self.samplers: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # empty: eager
        self.adapter: dict[tuple[int, Modules], torch.cuda.CUDAGraph] = {}
        self._module_sets: set[frozenset[ModuleKey]] = set()  # this layout's, up to MODULE_SETS
        self.adapter_failed = False  # an adapter forward failed to capture: those run eagerly
        self._layout: tuple[int, int] | None = None
        self.capture_seconds = 0.0
        self.captures = 0
        self.replays = 0

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding `n` rows; None past the largest (that step runs eagerly)."""
        for size in self.sizes:
            if size >= n:
                return size
        return None

    def _capture(self, rows: int, body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """`body` over bucket `rows`' padded buffers, captured."""
        step = self.step
        width = step.options.graph_blocks
        step.buffers.pad(0, rows, width, step.scratch_slot, step.block_size)
        step.buffers.upload(rows, width)
        graph = self._record(body)
        self.captures += 1
        return graph

    def _record(self, body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm-up runs of `body` on a side stream, then its capture into the shared pool."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (an adapter load) does not void the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            body()
        torch.cuda.synchronize()
        return graph

    @torch.inference_mode()
    def capture(self) -> float:
        """Captures the base forward and both samplers of every bucket (largest first, so the
        smaller ones reuse its pool memory). A base forward that fails raises; a sampler that
        fails is logged and every bucket's sampler then runs eagerly. Returns the seconds it
        took."""
        t0 = time.perf_counter()
        step, width = self.step, self.step.options.graph_blocks
        samplers = True
        for rows in reversed(self.sizes):
            self.base[rows] = self._capture(rows, lambda r=rows: step.forward(r, width, None))
            try:
                for full in (False, True) if samplers else ():
                    self.samplers[(rows, full)] = self._capture(
                        rows, lambda r=rows, f=full: step.sample_rows(r, f, f)
                    )
            except Exception as e:  # an op the sampler cannot capture: eager sampler
                log.warning("CUDA graph capture of the sampler failed, it runs eagerly after "
                            "each replayed forward: %s: %s", type(e).__name__, e)  # fmt: skip
                self.samplers.clear()
                samplers = False
        seconds = time.perf_counter() - t0
        self.capture_seconds += seconds
        return seconds

    def _modules(self, adapters: frozenset[ModuleKey]) -> Modules:
        """The key of the adapter forward that serves rows whose adapters have deltas on
        `adapters`: that set while this layout has fewer than MODULE_SETS, else ALL."""
        if adapters in self._module_sets or len(self._module_sets) < MODULE_SETS:
            self._module_sets.add(adapters)
            return adapters
        return ALL

    def _adapter_graph(self, rows: int, adapters: frozenset[ModuleKey]) -> torch.cuda.CUDAGraph:
        step = self.step
        assert step.slots is not None
        layout = layout_key(step.slots)
        if layout != self._layout:
            if self.adapter:
                log.info("adapter slot buffers grew to %s modules: recapturing the adapter "
                         "decode graphs", layout)  # fmt: skip
            self.adapter.clear()
            self._module_sets.clear()
            self._layout = layout
        modules = self._modules(adapters)
        graph = self.adapter.get((rows, modules))
        if graph is None:
            t0 = time.perf_counter()
            width = step.options.graph_blocks
            hook = step.hook(rows, None, None if modules == ALL else adapters)
            graph = self.adapter[(rows, modules)] = self._capture(
                rows, lambda: step.forward(rows, width, hook)
            )
            seconds = time.perf_counter() - t0
            self.capture_seconds += seconds
            log.info("captured the adapter decode graph of batch %d (%s modules) in %.3fs",
                     rows, len(adapters) if modules != ALL else "all", seconds)  # fmt: skip
        return graph

    def prepare(self, rows: int, adapters: frozenset[ModuleKey] | None) -> bool:
        """Captures what replay(rows, adapters, ...) needs, if missing; call it before the
        step fills the buffers (a capture overwrites them). `adapters`: the modules the rows'
        adapters have deltas on, None when no row has an adapter. False when that step must
        run eagerly: the adapter forward failed to capture, now or before (logged once)."""
        if adapters is None:
            return True
        if self.adapter_failed:
            return False
        try:
            self._adapter_graph(rows, adapters)
        except Exception as e:  # an op the adapter deltas cannot capture: those steps eager
            log.warning("CUDA graph capture of an adapter step failed, steps with adapters run "
                        "eagerly from now on: %s: %s", type(e).__name__, e)  # fmt: skip
            self.adapter_failed = True
            self.adapter.clear()
            return False
        return True

    def replay(self, rows: int, adapters: frozenset[ModuleKey] | None, full: bool) -> None:
        """The step over the buffers as filled and uploaded: the forward of bucket `rows`
        (with the deltas of the modules `adapters`; prepare() first), then its sampler
        (`full`: draws and penalties; else all rows greedy), eagerly if it has no graph."""
        if adapters is None:
            forward = self.base[rows]
        else:
            forward = self.adapter[(rows, self._modules(adapters))]
        forward.replay()
        sampler = self.samplers.get((rows, full))
        if sampler is None:
            self.step.sample_rows(rows, full, full)
        else:
            sampler.replay()
        self.replays += 1
