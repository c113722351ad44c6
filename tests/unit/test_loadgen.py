"""The load generator's planning and statistics, without a server."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from peftserve.client import loadgen as L


def spec(**kw) -> L.LoadSpec:
    return L.LoadSpec(**{"adapters": ("base", "a", "b", "c"), "concurrency": 4,
                         "max_requests": 200, **kw})


@pytest.mark.parametrize("text,lo,hi", [("7", 7, 7), ("3-9", 3, 9), ("1-1", 1, 1)])
def test_lengths_parse(text, lo, hi):
    n = L.Lengths.parse(text)
    assert (n.lo, n.hi) == (lo, hi)
    rng = random.Random(0)
    assert all(lo <= n.sample(rng) <= hi for _ in range(200))
    assert str(n) == (str(lo) if lo == hi else f"{lo}-{hi}")


def test_exponential_lengths_have_their_mean():
    n = L.Lengths.parse("exp:20")
    rng = random.Random(0)
    xs = [n.sample(rng) for _ in range(20000)]
    assert min(xs) >= 1 and max(xs) <= 160
    assert sum(xs) / len(xs) == pytest.approx(20, rel=0.05)


@pytest.mark.parametrize("bad", ["0", "9-3", "x", "exp:0", "-4", ""])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(ValueError, match="length"):
        L.Lengths.parse(bad)


@pytest.mark.parametrize("kw,msg", [
    ({"adapters": ()}, "at least one adapter"),
    ({"rate": 2.0}, "exactly one of rate"),
    ({"concurrency": None}, "exactly one of rate"),
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": None, "rate": -1.0}, "rate must be"),
    ({"popularity": "pareto"}, "popularity"),
    ({"zipf_alpha": 0.0}, "alpha"),
    ({"duration_s": 0.0}, "duration"),
    ({"max_requests": 0}, "max_requests"),
])
def test_bad_specs_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        spec(**kw)


def test_plan_is_reproducible_and_seeded():
    a = list(L.plan(spec(seed=5)))
    assert a == list(L.plan(spec(seed=5)))
    assert a != list(L.plan(spec(seed=6)))
    assert len(a) == 200 and [p.index for p in a] == list(range(200))
    lens = spec().prompt_len
    assert all(lens.lo <= len(p.prompt.split()) <= lens.hi for p in a)


def test_zipf_popularity_follows_rank():
    s = spec(popularity="zipf", zipf_alpha=1.0, max_requests=20000)
    counts = Counter(p.adapter for p in L.plan(s))
    # P(i) = (1/i) / H_4 for i = 1..4.
    h = sum(1 / i for i in range(1, 5))
    for i, name in enumerate(s.adapters, start=1):
        assert counts[name] / 20000 == pytest.approx(1 / i / h, abs=0.015)
    uniform = Counter(p.adapter for p in L.plan(spec(max_requests=20000)))
    assert all(c / 20000 == pytest.approx(0.25, abs=0.015) for c in uniform.values())


def test_poisson_arrivals_have_the_rate_and_stop_at_the_duration():
    s = spec(concurrency=None, rate=50.0, duration_s=100.0, max_requests=None)
    at = [p.at_s for p in L.plan(s)]
    assert at == sorted(at) and at[-1] <= 100.0
    assert len(at) == pytest.approx(5000, rel=0.05)
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    # Exponential gaps: mean 1/rate, and the std equals the mean.
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert mean == pytest.approx(0.02, rel=0.05) and std == pytest.approx(0.02, rel=0.08)


def test_percentiles_nearest_rank():
    p = L.percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (p["p50_ms"], p["p90_ms"], p["p99_ms"]) == (50.0, 90.0, 99.0)
    assert p["mean_ms"] == 50.5
    assert L.percentiles([])["p50_ms"] is None


def test_histogram_quantile_interpolates_like_prometheus():
    # 10 observations <= 0.1, 10 more <= 0.2, 0 beyond: the median is the first bucket's top,
    # p75 halfway into the second bucket.
    buckets = {0.1: 10.0, 0.2: 20.0, math.inf: 20.0}
    assert L.histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert L.histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert L.histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    # Ranks falling in +Inf answer the largest finite bound, as Prometheus does.
    assert L.histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == pytest.approx(0.1)
    assert L.histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_report_groups_by_kind_and_counts_errors():
    recs = [L.Record(0, "base", "base", ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4,
                     prompt_tokens=5, completion_tokens=5),
            L.Record(1, "a", "lora", ttft_s=0.2, e2e_s=0.6, itl_s=[0.1] * 4,
                     prompt_tokens=5, completion_tokens=5),
            L.Record(2, "a", "unknown", status="RESOURCE_EXHAUSTED")]
    r = L.report(spec(), recs, wall_s=2.0)
    assert r["throughput"] == {"requests_per_s": 1.0, "output_tokens_per_s": 5.0,
                               "prompt_tokens_per_s": 5.0}
    assert r["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert r["by_kind"]["lora"]["ttft"]["p50_ms"] == 200.0
    assert r["by_adapter"]["a"]["requests"] == 2 and r["by_adapter"]["a"]["ok"] == 1
    assert "RESOURCE_EXHAUSTED x1" in L.render(r)
