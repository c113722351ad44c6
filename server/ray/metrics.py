"""The Ray application's /metrics: every live replica's own `peftserve_*` metrics (as its
last report to the shared registry carried them) with a `replica` label, and routing affinity.

Served by the process that started the application, so Prometheus scrapes one endpoint however
many replicas there are; a replica's numbers are at most `sync_interval_s` old.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from peftserve.ray.directory import ReplicaReport

REPLICA_LABEL = "replica"
ROUTED = "peftserve_routed_requests_total"


class ReplicaMetrics(Collector):
    def __init__(self, fetch: Callable[[], list[ReplicaReport]]) -> None:
        self.fetch = fetch  # the live replicas' last reports, read at each scrape

    def collect(self) -> Iterator[Metric]:
        reports = self.fetch()
        families: dict[str, Metric] = {}
        routed = {"true": 0.0, "false": 0.0}
        for report in reports:
            for family in text_string_to_metric_families(report.metrics_text):
                out = families.get(family.name)
                if out is None:
                    out = families[family.name] = Metric(family.name, family.documentation,
                                                          family.type, family.unit)
                for s in family.samples:
                    out.samples.append(Sample(s.name, {**s.labels, REPLICA_LABEL: report.replica},
                                              s.value, s.timestamp, s.exemplar))
                    if s.name == ROUTED and s.labels.get("adapter_resident") in routed:
                        routed[s.labels["adapter_resident"]] += s.value
        yield from families.values()
        yield GaugeMetricFamily("peftserve_replicas", "Engine replicas reporting.",
                                value=len(reports))
        total = routed["true"] + routed["false"]
        if total:
            yield GaugeMetricFamily(
                "peftserve_routing_affinity_ratio",
                "Of the adapter requests served since the replicas started, the share that "
                "reached a replica already holding their adapter (from "
                "peftserve_routed_requests_total).", value=routed["true"] / total)
