"""The engine-side metrics (metrics.EngineCollector): each scrape reads a fresh EngineStats."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from peftserve.engine.stats import EngineStats
from peftserve.metrics import EngineCollector


def stats(**kw) -> EngineStats:
    values = dict(num_running=3, num_waiting=1, batch_size=3, batch_tokens=3, kv_blocks_used=9,
                  kv_blocks_total=64, running_adapters=("a",), waiting_adapters=(), max_loras=4)
    return EngineStats(**{**values, **kw})  # type: ignore[arg-type]


def test_the_steps_and_the_steps_scheduled_ahead_are_counters():
    collector = EngineCollector()
    now = {"stats": stats(steps=10, steps_ahead=7, ahead_rows_dropped=2)}
    collector.refresh = lambda: now["stats"]
    registry = CollectorRegistry()
    registry.register(collector)
    value = registry.get_sample_value
    assert value("peftserve_engine_steps_total") == 10
    assert value("peftserve_engine_steps_ahead_total") == 7
    assert value("peftserve_engine_ahead_rows_dropped_total") == 2
    now["stats"] = stats(steps=12, steps_ahead=9, ahead_rows_dropped=2)
    assert value("peftserve_engine_steps_ahead_total") == 9
