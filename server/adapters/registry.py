"""Adapter registry: name -> entry, with a host-memory LRU tier over the disk tier.

Lives on the engine thread, except `load_from_disk`, which only reads files (it runs in a worker
thread so that a cold adapter makes its own requests wait, never the batch).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftserve.adapters.errors import AdapterExists, AdapterNotFound, InvalidAdapter
from peftserve.adapters.files import FileDigest
from peftserve.adapters.handle import AdapterInfo, AdapterKind
from peftserve.adapters.loader import AdapterLimits, LoadedAdapter, load_adapter
from peftserve.adapters.shared_prefix import SharedPrefix
from peftserve.adapters.template import PromptTemplate
from peftserve.errors import shorten
from peftserve.models.llama import ModelShape

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# `other` is the metrics' `adapter` label of every adapter past the label limit: an adapter of
# that name would share its series with them.
RESERVED_NAMES = frozenset({"other"})


def validate_name(name: str) -> str:
    if name in RESERVED_NAMES:
        raise InvalidAdapter(f"adapter name {name!r} is reserved (it is the metrics' label of "
                             "adapters past --metrics-max-adapter-labels)")
    if not NAME_RE.match(name or ""):
        raise InvalidAdapter(
            f"adapter name {shorten(name)} must be 1-128 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(eq=False)
class AdapterEntry:
    name: str
    kind: AdapterKind
    source: Path
    num_params: int
    num_bytes: int
    ranks: dict[str, int]
    loaded: LoadedAdapter | None  # host tier; None = on disk only
    load_time_s: float | None
    registered_at: float = field(default_factory=time.time)
    slot: int | None = None  # device slot (LoRA / bottleneck)
    prefix: SharedPrefix | None = None  # on device (prefix / prompt tuning, templates)
    active: int = 0  # requests holding this entry (waiting or running)
    running: int = 0  # running sequences using its slot or prefix (pins it on device)
    requests_served: int = 0
    removed: bool = False  # unregistered or replaced while requests still hold it
    loading: Future | None = None
    template: PromptTemplate | None = None  # kept even when the weights leave host memory
    files: dict[str, FileDigest] = field(default_factory=dict)  # as registered: reloads match

    def residency(self) -> str:
        if self.slot is not None or self.prefix is not None:
            return "device"
        return "host" if self.loaded is not None else "disk"

    def info(self) -> AdapterInfo:
        return AdapterInfo(
            self.name,
            self.kind,
            str(self.source),
            self.num_params,
            self.num_bytes,
            dict(self.ranks),
            self.residency(),
            self.load_time_s,
            self.requests_served,
            self.registered_at,
        )


class AdapterRegistry:
    def __init__(self, shape: ModelShape, limits: AdapterLimits, max_cpu_adapters: int) -> None:
        self.shape, self.limits, self.max_cpu_adapters = shape, limits, max_cpu_adapters
        self._entries: dict[str, AdapterEntry] = {}
        self._host_lru: OrderedDict[AdapterEntry, None] = OrderedDict()
        # Loads run here, never on the engine thread. One torch thread each: a worker whose ops go
        # parallel gets an OpenMP team of its own, which then competes with the engine thread's
        # for the cores (measured: a batch of two LoRAs at 85 instead of 169 tok/s on 2 cores
        # once a rank-64 adapter had been loaded this way).
        self._pool = ThreadPoolExecutor(
            max_workers=2,
            thread_name_prefix="adapter-load",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self.loads = 0
        self.load_seconds = 0.0
        self.host_evictions = 0
        # called on the loader thread as each load ends (AsyncEngine: wakes its step loop,
        # which otherwise looks again only after a poll interval)
        self.on_loaded: Callable[[], None] | None = None

    def submit_load(self, directory: Path, expected: Mapping[str, FileDigest] | None = None
                    ) -> Future:
        """load_from_disk on a loader thread; the future's result is the LoadedAdapter."""
        if expected is None:
            future = self._pool.submit(self.load_from_disk, directory)
        else:
            future = self._pool.submit(self.load_from_disk, directory, expected)
        future.add_done_callback(self._loaded)
        return future

    def _loaded(self, _: Future) -> None:
        callback = self.on_loaded
        if callback is not None:
            callback()

    def load_from_disk(self, directory: Path, expected: Mapping[str, FileDigest] | None = None
                       ) -> LoadedAdapter:
        """Thread-safe: reads and validates files only. `expected`: see loader.load_adapter."""
        return load_adapter(directory, self.shape, self.limits, expected)

    def add(
        self,
        name: str,
        loaded: LoadedAdapter,
        source: Path,
        replace: bool = False,
        on_replaced=None,
    ) -> AdapterEntry:
        validate_name(name)
        old = self._entries.get(name)
        if old is not None and not replace:
            raise AdapterExists(f"adapter {shorten(name)} is already registered (use replace)")
        entry = AdapterEntry(
            name,
            loaded.kind,
            source,
            loaded.num_params,
            loaded.num_bytes,
            loaded.ranks(),
            loaded,
            loaded.load_time_s,
            template=loaded.template,
            files=dict(loaded.files),
        )
        self._entries[name] = entry
        self._touch_host(entry)
        self.loads += 1
        self.load_seconds += loaded.load_time_s
        if old is not None and on_replaced is not None:
            on_replaced(old)
        return entry

    def remove(self, name: str) -> AdapterEntry:
        entry = self.get(name)
        del self._entries[name]
        entry.removed = True
        self._host_lru.pop(entry, None)
        return entry

    def get(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"adapter {shorten(name)} is not registered")
        return entry

    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    # --- host tier --------------------------------------------------------------------------

    def ensure_host(self, entry: AdapterEntry) -> bool:
        """True when the weights are in host memory; otherwise starts loading them in the
        background (once) and returns False."""
        if entry.loaded is not None:
            self._touch_host(entry)
            return True
        if entry.loading is None:
            entry.loading = self.submit_load(entry.source, entry.files)
            return False
        if not entry.loading.done():
            return False
        future, entry.loading = entry.loading, None
        loaded = future.result()  # files gone -> InvalidAdapter, changed -> AdapterChanged
        entry.loaded, entry.load_time_s = loaded, loaded.load_time_s
        self.loads += 1
        self.load_seconds += loaded.load_time_s
        self._touch_host(entry)
        return True

    @staticmethod
    def load_in_flight(entry: AdapterEntry) -> bool:
        """True while the adapter's weights are on their way to host memory (ensure_host
        started a load that has not ended): a request for it cannot be admitted yet."""
        return entry.loaded is None and entry.loading is not None and not entry.loading.done()

    def _touch_host(self, entry: AdapterEntry) -> None:
        self._host_lru[entry] = None
        self._host_lru.move_to_end(entry)
        while len(self._host_lru) > self.max_cpu_adapters:
            victim = next((e for e in self._host_lru if e.active == 0 and e is not entry), None)
            if victim is None:
                break  # everything in host memory is in use
            del self._host_lru[victim]
            victim.loaded = None
            self.host_evictions += 1

    def resident_counts(self) -> dict[str, int]:
        counts = {"device": 0, "host": 0, "disk": 0}
        for e in self._entries.values():
            counts[e.residency()] += 1
        return counts

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
