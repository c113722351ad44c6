"""Every Prometheus metric peftserve exports, in one place.

Per-request latencies are recorded by the gRPC layer as outputs reach the event loop
(`RequestTracker`). Engine-side numbers (batch, KV blocks, adapter tiers and loads) are read
from one `EngineStats` snapshot taken on the engine thread at scrape time (`EngineCollector`),
so a scrape never walks engine structures from the HTTP thread.

Labels stay bounded: `adapter_kind` always; `adapter` for the first `max_adapter_labels` adapter
names that served a request, every later one as `other`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from peftserve.adapters.handle import BASE_KIND
from peftserve.engine.request import RequestOutput
from peftserve.engine.stats import EngineStats

BASE_LABEL = "__base__"  # `adapter` label of base-model requests (PEFT's name for "no adapter")
OTHER_LABEL = "other"
UNKNOWN_KIND = "unknown"  # a request that failed before its adapter was resolved

# Seconds; CPU decode steps take tens of ms, GPU ones a few, cold starts seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1.0, 2.5)


class Metrics:
    def __init__(self, max_adapter_labels: int = 32,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_adapter_labels = max_adapter_labels
        self._labels: dict[str, str] = {}  # adapter name with its own label -> its kind
        self._lock = threading.Lock()
        per_request = ("adapter_kind", "adapter")
        r = self.registry
        self.ttft = Histogram("peftserve_request_ttft_seconds",
                              "Arrival at the engine to the first generated token.",
                              per_request, buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("peftserve_request_inter_token_seconds",
                                     "Time between successive tokens of a request, as streamed.",
                                     per_request, buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("peftserve_request_e2e_seconds",
                             "Arrival at the engine to the last token.",
                             per_request, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("peftserve_request_queue_seconds",
                               "Arrival at the engine to first scheduled.",
                               per_request, buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("peftserve_requests",
                                "Generate requests by outcome: stop/length when finished, "
                                "else the gRPC status code name.",
                                (*per_request, "outcome"), registry=r)
        self.generated_tokens = Counter("peftserve_generated_tokens",
                                        "Tokens generated (streamed to clients).",
                                        per_request, registry=r)
        self.active_streams = Gauge("peftserve_active_streams",
                                    "Generate and GenerateStream calls in flight.", registry=r)
        self.engine = EngineCollector()
        r.register(self.engine)

    def labels_before_serving(self, adapter: str | None) -> tuple[str, str]:
        """(adapter_kind, adapter) labels of a request whose adapter has not answered yet: what
        is known of it, else `unknown` / `other` (unknown names cannot take up label slots)."""
        if not adapter:
            return BASE_KIND, BASE_LABEL
        with self._lock:
            kind = self._labels.get(adapter)
        return (UNKNOWN_KIND, OTHER_LABEL) if kind is None else (kind, adapter)

    def labels_serving(self, adapter: str | None, kind: str) -> tuple[str, str]:
        """(adapter_kind, adapter) labels of a request its adapter is serving: the first
        `max_adapter_labels` adapters get their own `adapter` label, later ones `other`."""
        if not adapter:
            return kind, BASE_LABEL
        with self._lock:
            if adapter in self._labels or len(self._labels) < self.max_adapter_labels:
                self._labels[adapter] = kind
                return kind, adapter
        return kind, OTHER_LABEL

    def track(self, adapter: str | None) -> RequestTracker:
        return RequestTracker(self, adapter)


class RequestTracker:
    """Records one request's latencies, tokens and outcome. Event-loop side."""

    def __init__(self, metrics: Metrics, adapter: str | None) -> None:
        self.m = metrics
        self.adapter = adapter
        self.kind, self.label = metrics.labels_before_serving(adapter)
        self._started = False
        self._last_token_at: float | None = None
        self._done = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if not self._started:
            self._started = True
            self.kind, self.label = self.m.labels_serving(self.adapter, out.adapter_kind)
            # Looked up once: a streamed token then costs one observe and one inc.
            self._inter_token = self.m.inter_token.labels(self.kind, self.label)
            self._tokens = self.m.generated_tokens.labels(self.kind, self.label)
        n = len(out.token_ids)
        if n:
            if self._last_token_at is None:
                if out.timings is not None:
                    self.m.queue.labels(self.kind, self.label).observe(out.timings.queue_s)
                    if out.timings.ttft_s is not None:
                        self.m.ttft.labels(self.kind, self.label).observe(out.timings.ttft_s)
            else:
                gap = (now - self._last_token_at) / n
                for _ in range(n):
                    self._inter_token.observe(gap)
            self._last_token_at = now
            self._tokens.inc(n)
        if out.finished and out.timings is not None and out.timings.e2e_s is not None:
            self.m.e2e.labels(self.kind, self.label).observe(out.timings.e2e_s)

    def finish(self, outcome: str) -> None:
        if not self._done:
            self._done = True
            self.m.requests.labels(self.kind, self.label, outcome).inc()


class EngineCollector(Collector):
    """Engine-side metrics from a fresh `EngineStats` at each scrape. `refresh` is set by the
    server: it fetches a snapshot from the engine thread (None when it cannot in time)."""

    def __init__(self) -> None:
        self.refresh: Callable[[], EngineStats | None] | None = None
        self._last: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.refresh() if self.refresh is not None else None
        if stats is not None:
            self._last = stats
        s = self._last
        if s is None:
            return
        yield _gauge("peftserve_batch_size", "Sequences in the engine's last step.", s.batch_size)
        yield _gauge("peftserve_batch_tokens", "Tokens in the engine's last step.", s.batch_tokens)
        yield _gauge("peftserve_requests_running", "Sequences running.", s.num_running)
        yield _gauge("peftserve_requests_waiting", "Sequences in the waiting queue.",
                     s.num_waiting)
        yield _gauge("peftserve_kv_blocks_used", "KV cache blocks in use.", s.kv_blocks_used)
        yield _gauge("peftserve_kv_blocks_total", "KV cache blocks in all.", s.kv_blocks_total)
        yield _counter("peftserve_adapter_loads", "Adapter loads from disk.", s.adapter_loads)
        load = SummaryMetricFamily("peftserve_adapter_load_seconds",
                                   "Time spent loading adapters from disk.")
        load.add_metric([], count_value=s.adapter_loads, sum_value=s.adapter_load_seconds)
        yield load
        yield _counter("peftserve_adapter_cache_hits", "Requests whose adapter was resident.",
                       s.cache_hits)
        yield _counter("peftserve_adapter_cache_misses",
                       "Requests whose adapter had to be loaded.", s.cache_misses)
        yield _counter("peftserve_adapter_cache_evictions", "Adapters evicted from a tier.",
                       s.cache_evictions)
        yield _counter("peftserve_engine_steps", "Engine steps run.", s.steps)
        yield _counter("peftserve_engine_steps_ahead",
                       "Decode steps queued on the device before the last step's tokens were "
                       "back (where CUDA graphs replay).", s.steps_ahead)
        yield _counter("peftserve_engine_ahead_rows_dropped",
                       "Rows of steps queued ahead whose sequence had ended meanwhile.",
                       s.ahead_rows_dropped)
        resident = GaugeMetricFamily("peftserve_adapters_resident",
                                     "Registered adapters by where their weights are.",
                                     labels=("tier",))
        for tier, count in sorted(s.adapters_resident.items()):
            resident.add_metric([tier], count)
        yield resident
        # vLLM's `lora_requests_info`, read by adapter-aware gateways (Gateway API inference
        # extension). One series at a time: the label values are replaced, never accumulated.
        info = GaugeMetricFamily("peftserve_lora_requests_info",
                                 "Adapters running and waiting now; value: unix time.",
                                 labels=("running_lora_adapters", "waiting_lora_adapters",
                                         "max_lora"))
        info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters),
                         str(s.max_loras)], time.time())
        yield info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
