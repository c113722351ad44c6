"""The one registry every replica reads: adapter name -> where its files are and which version
is current, and what each replica last reported (its adapters, its metrics).

It runs as one Ray actor per application (`ray.remote(AdapterDirectory)`). Registering bumps
the adapter's version and the directory's generation; each replica polls `sync` every
`sync_interval_s`, drops any local adapter whose version is no longer current, and acknowledges
the generation it applied, so an unregister can wait until every live replica has let go.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from peftserve.adapters.errors import AdapterExists, AdapterNotFound
from peftserve.adapters.handle import AdapterInfo

RESIDENCY_ORDER = ("disk", "host", "device")  # the warmest replica speaks for an adapter
STALE_AFTER_S = 10.0  # a replica silent this long is gone (scaled down or dead)


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    source: str  # the directory every replica loads from (under the shared adapter root)
    version: int  # unique per registration; a replica holding another version reloads
    info: AdapterInfo | None = None  # as the replica that checked the files saw it


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve's replica id
    adapters: tuple[AdapterInfo, ...]  # what its engine has registered now
    metrics_text: str  # its Prometheus exposition, without the replica label
    at: float  # time.time() when sent


class AdapterDirectory:
    def __init__(self) -> None:
        self._records: dict[str, AdapterRecord] = {}
        self._generation = 0  # bumped by every register / unregister
        self._last_version = 0
        self._reports: dict[str, ReplicaReport] = {}
        self._acked: dict[str, int] = {}  # replica -> the generation it has applied

    # --- registrations (the ingress) --------------------------------------------------------

    async def new_version(self) -> int:
        self._last_version += 1
        return self._last_version

    async def put(self, record: AdapterRecord, replace: bool) -> int:
        if record.name in self._records and not replace:
            raise AdapterExists(f"adapter {record.name!r} is already registered (use replace)")
        self._records[record.name] = record
        self._generation += 1
        return self._generation

    async def remove(self, name: str) -> int:
        if self._records.pop(name, None) is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        self._generation += 1
        return self._generation

    async def has(self, name: str) -> bool:
        return name in self._records

    async def get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return record

    async def infos(self, name: str | None = None) -> list[AdapterInfo]:
        """Each registered adapter's info (or just `name`'s), with the warmest residency any
        replica has and the requests all replicas served."""
        records = [await self.get(name)] if name is not None else list(self._records.values())
        held: dict[str, list[AdapterInfo]] = {}
        for report in self._live_reports():
            for info in report.adapters:
                held.setdefault(info.name, []).append(info)
        out = []
        for r in records:
            assert r.info is not None, "a record is stored with the info of its check"
            mine = [i for i in held.get(r.name, []) if i.source == r.source]
            residency = max((i.residency for i in mine), key=RESIDENCY_ORDER.index,
                            default="disk")
            loads = [i.load_time_s for i in mine if i.load_time_s is not None]
            out.append(AdapterInfo(
                r.name, r.info.kind, r.source, r.info.num_params, r.info.num_bytes,
                dict(r.info.ranks), residency, max(loads) if loads else r.info.load_time_s,
                sum(i.requests_served for i in mine), r.info.registered_at))
        return out

    async def wait_applied(self, generation: int, timeout_s: float) -> list[str]:
        """Waits until every live replica has applied `generation`; returns those that had not
        when the time ran out (empty: all did)."""
        deadline = time.monotonic() + timeout_s
        while True:
            behind = [r.replica for r in self._live_reports()
                      if self._acked.get(r.replica, 0) < generation]
            if not behind or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(0.02)

    # --- replicas ---------------------------------------------------------------------------

    async def sync(self, report: ReplicaReport) -> tuple[int, dict[str, int]]:
        """Stores a replica's report; answers the generation and the current versions."""
        self._reports[report.replica] = report
        return self._generation, {n: r.version for n, r in self._records.items()}

    async def ack(self, replica: str, generation: int) -> None:
        self._acked[replica] = max(generation, self._acked.get(replica, 0))

    async def reports(self) -> list[ReplicaReport]:
        return self._live_reports()

    def _live_reports(self) -> list[ReplicaReport]:
        now = time.time()
        return [r for r in self._reports.values() if now - r.at < STALE_AFTER_S]
