"""The short fuzz and soak run against a real server (the long one: `make soak`)."""

from __future__ import annotations

from tests.e2e import soak


def test_fuzz_and_soak_short(tiny_llama_dir, tmp_path):
    report, problems = soak.run(tmp_path, requests=2000, streams=64, seed=1,
                                rss_growth_mib=256.0, model_dir=tiny_llama_dir)
    assert problems == [], problems
    codes = report.codes
    # The run did what it says: malformed messages refused, streams served and cancelled,
    # adapters hot-swapped, hostile admin calls refused.
    assert codes["malformed:INVALID_ARGUMENT"] > 100
    assert codes["stream:OK"] > 0 and codes["stream:CANCELLED_BY_CLIENT"] > 0
    assert codes["swap:OK"] > 0
    assert codes["admin:UNAUTHENTICATED"] > 0 and codes["generate:OK"] > 0
    assert sum(codes.values()) >= 2000 + 64
    assert report.kv_blocks_used == report.kv_blocks_prefixes
