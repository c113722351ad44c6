"""One engine per Ray Serve replica.

The adapter a request names is its multiplexed model id. `get_adapter()` is `load_adapter()`
wrapped in `serve.multiplexed` by `app.build` (with the configured LRU size): a cold adapter
is registered on this replica's engine from the shared registry's record, and Ray Serve's LRU
eviction unregisters it again (requests already using it finish first). Every
`sync_interval_s` the replica reports its adapters and metrics to the shared registry and drops
adapters that were unregistered or replaced there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from prometheus_client import Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray import serve

from peftserve.adapters.handle import AdapterInfo
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.stats import EngineInfo, EngineStats
from peftserve.errors import InvalidRequest
from peftserve.gateway import Gateway
from peftserve.grpc.errors import code_of, outcome
from peftserve.metrics import Metrics
from peftserve.ray.config import RayConfig
from peftserve.ray.directory import AdapterRecord, ReplicaReport
from peftserve.ray.remote import call
from peftserve.serve_config import ServeConfig

log = logging.getLogger(__name__)


class ResidentAdapter:
    """What Ray Serve's multiplexed LRU holds for one adapter on one replica. Ray Serve calls
    `__del__` when it evicts the adapter (and the garbage collector may call it again)."""

    def __init__(self, replica: EngineReplica, name: str) -> None:
        self.replica, self.name = replica, name
        self._evicted = False

    def __del__(self) -> None:  # run by Ray Serve in an executor thread
        if not self._evicted:
            self._evicted = True
            self.replica.on_evicted(self.name)


class _AdaptersHere(Collector):
    """`peftserve_adapter_on_replica{adapter}`: the adapters this replica's engine has
    registered now (at most its multiplexed LRU size, so the label stays bounded)."""

    def __init__(self, versions: dict[str, int]) -> None:
        self.versions = versions

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("peftserve_adapter_on_replica",
                                   "Adapters registered on this replica's engine (1 each).",
                                   labels=("adapter",))
        for name in sorted(self.versions):
            family.add_metric([name], 1)
        yield family


class EngineReplica:
    """A plain class: `app.build` makes it a deployment with the configured resources."""

    async def __init__(self, config: ServeConfig, ray_config: RayConfig, directory: Any) -> None:
        self.config, self.ray_config, self.directory = config, ray_config, directory
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._loop = asyncio.get_running_loop()
        self.engine = AsyncEngine()
        await asyncio.to_thread(self.engine.start, lambda: Engine.from_config(config.engine))
        self._versions: dict[str, int] = {}  # adapter -> version registered on this engine
        self.metrics = Metrics(config.metrics_max_adapter_labels)
        self.routed = Counter(
            "peftserve_routed_requests",
            "Requests this replica served, by whether it already held their adapter when they "
            "arrived (true/false; base: no adapter). Affinity = true / (true + false).",
            ("adapter_resident",), registry=self.metrics.registry)
        self.metrics.registry.register(_AdaptersHere(self._versions))
        self._stats: EngineStats | None = None
        self.metrics.engine.refresh = lambda: self._stats  # refreshed by the sync loop
        self._held: set[str] = set()  # adapters in Ray Serve's multiplexed LRU here
        self._users: dict[str, int] = {}  # adapter -> requests between lookup and finish
        self._evict_when_idle: set[str] = set()
        self._tasks: set[asyncio.Future] = set()
        self._locks: dict[str, asyncio.Lock] = {}  # one registration change per adapter
        self._pending: dict[str, AdapterRecord] = {}  # being registered through this replica
        # The cap on streams, the prompt-length limit and the per-request metrics, as on one
        # server.
        self.gateway = Gateway(self.engine, config, self.metrics)
        self._sync_task = asyncio.create_task(self._sync_loop())

    # --- adapters ---------------------------------------------------------------------------

    async def get_adapter(self, name: str) -> ResidentAdapter:
        """Serve.multiplexed's cached `load_adapter` (app.build sets it)."""
        raise NotImplementedError("app.build wraps load_adapter in serve.multiplexed")

    async def load_adapter(self, name: str) -> ResidentAdapter:
        """Registers a cold adapter from the shared registry: the multiplexed loader."""
        record = self._pending.get(name) or await call(self.directory.get.remote(name))
        await self._ensure(record)
        self._held.add(name)
        self._evict_when_idle.discard(name)
        log.info("replica %s loaded adapter %s v%d", self.replica_id, name, record.version)
        return ResidentAdapter(self, name)

    async def _ensure(self, record: AdapterRecord) -> None:
        """Registers `record` on this engine unless that version already is."""
        async with self._lock(record.name):
            if self._versions.get(record.name) == record.version:
                return
            await self.engine.register_adapter(record.name, Path(record.source), replace=True)
            self._versions[record.name] = record.version

    async def _drop(self, name: str, version: int) -> None:
        """Unregisters `name` here if `version` is still the one registered (a register or a
        drop of the same name waits for this one: they are never interleaved)."""
        async with self._lock(name):
            if self._versions.get(name) != version:
                return
            del self._versions[name]
            try:
                await self.engine.unregister_adapter(name)
            except Exception as e:  # already gone: nothing to free
                log.debug("replica %s: unregister %s: %r", self.replica_id, name, e)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _current(self, name: str, version: int) -> None:
        """Serve.multiplexed's cached adapter, at the version the ingress looked up."""
        await self.get_adapter(name)
        if self._versions.get(name) != version:  # replaced, or dropped by a sync meanwhile
            await self._ensure(await call(self.directory.get.remote(name)))

    def on_evicted(self, name: str) -> None:
        self._loop.call_soon_threadsafe(self._evicted, name)

    def _evicted(self, name: str) -> None:
        self._held.discard(name)
        if self._users.get(name, 0):
            self._evict_when_idle.add(name)  # dropped when its last request here finishes
        else:
            self._drop_soon(name)

    def _drop_soon(self, name: str) -> None:
        version = self._versions.get(name)
        if version is not None:
            task = asyncio.ensure_future(self._drop(name, version))
            self._tasks.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

    async def register(self, record: AdapterRecord) -> AdapterInfo:
        """Checks and registers an adapter on this replica for the ingress, which stores the
        record in the registry only if this succeeds."""
        self._pending[record.name] = record
        try:
            await self._ensure(record)
            await self.get_adapter(record.name)  # now in Ray Serve's LRU here, too
        finally:
            self._pending.pop(record.name, None)
        return await self.engine.get_adapter(record.name)

    # --- requests ---------------------------------------------------------------------------

    async def generate(self, req: Request, version: int | None) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; a cancelled call (client gone, deadline) aborts the
        request in the engine, which frees its KV blocks."""
        name = serve.get_multiplexed_model_id() or None
        if name != req.adapter:
            raise InvalidRequest(f"multiplexed model id {name!r} is not the request's adapter "
                                 f"{req.adapter!r}")
        req = dataclasses.replace(req, arrival_time=time.monotonic())
        if name is None:
            self.routed.labels("base").inc()
        else:
            assert version is not None, "the ingress looks the version up"
            self.routed.labels(str(name in self._held).lower()).inc()
            await self._current(name, version)
            self._users[name] = self._users.get(name, 0) + 1  # until it finishes here
        try:
            # Closed at once when the call is cancelled: the engine aborts the request now, not
            # when the garbage collector finds the generator.
            outs = self.gateway.generate(req, outcome_of=lambda e: outcome(code_of(e)))
            async with aclosing(outs):
                async for out in outs:
                    yield out
        finally:
            if name is not None:
                self._release(name)

    def _release(self, name: str) -> None:
        self._users[name] -= 1
        if not self._users[name]:
            del self._users[name]
            if name in self._evict_when_idle:
                self._evict_when_idle.discard(name)
                self._drop_soon(name)

    async def info(self) -> EngineInfo:
        return await self.engine.info()

    # --- the shared registry ----------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self._sync_once()
            except Exception:
                log.exception("replica %s: sync with the adapter registry failed",
                              self.replica_id)
            await asyncio.sleep(self.ray_config.sync_interval_s)

    async def _sync_once(self) -> None:
        self._stats = await self.engine.stats()
        report = ReplicaReport(self.replica_id, tuple(await self.engine.list_adapters()),
                               generate_latest(self.metrics.registry).decode(), time.time())
        generation, versions = await self.directory.sync.remote(report)
        for name, version in list(self._versions.items()):
            if versions.get(name) != version:  # unregistered, or replaced elsewhere
                await self._drop(name, version)
        await self.directory.ack.remote(self.replica_id, generation)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)  # None: __init__ failed before it existed
        if engine is not None:
            engine.shutdown()
