"""`peftserve bench`: a load generator against a running server over gRPC.

Open loop (`rate`): requests arrive as a Poisson process whatever the server's speed, as users
do; closed loop (`concurrency`): a fixed number of requests in flight. Each request names an
adapter drawn from a uniform or Zipf popularity over the given adapters (the S-LoRA / Punica
set-ups), a prompt of a drawn length and a drawn number of output tokens (EOS ignored, so the
server produces exactly that many). Everything drawn comes from one seed: two runs with the same
spec send the same requests in the same order at the same offsets.

Latencies are measured on the client: TTFT from sending the request to the first chunk carrying
tokens, inter-token from the gaps between such chunks (a gap over k tokens counts k times as
gap/k, the server's own definition), e2e to the last chunk. `cross_check` compares them with the
server's Prometheus histograms over the same interval.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from peftserve.client.aio import AsyncClient
from peftserve.client.errors import ApiError
from peftserve.client.types import Sampling

BASE = "base"  # the name that selects the base model in an adapter list
# Common one-token words: a prompt of n of them is about n tokens in any BPE vocabulary; the
# server reports the exact count back (usage), which is what the report uses.
WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at",
         "be", "this", "have", "from", "or", "one", "had", "by", "but", "not", "what", "all",
         "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which",
         "she", "do", "how", "their", "if", "will", "up", "other", "about", "out", "many",
         "then", "them", "these", "so", "some", "her", "would", "make", "like", "him", "into",
         "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way",
         "could", "people", "my", "than", "first", "water", "been", "call", "who", "its", "now",
         "find", "long", "down", "day", "did", "get", "come", "made", "may", "part")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Lengths:
    """A token-count distribution: `N` (fixed), `LO-HI` (uniform, inclusive) or `exp:MEAN`
    (exponential, at least 1, at most 8x the mean)."""

    kind: str
    lo: int
    hi: int
    mean: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Lengths:
        try:
            if spec.startswith("exp:"):
                mean = float(spec[4:])
                if mean < 1:
                    raise ValueError
                return cls("exp", 1, max(1, round(8 * mean)), mean)
            if "-" in spec:
                lo, hi = (int(x) for x in spec.split("-", 1))
            else:
                lo = hi = int(spec)
        except ValueError:
            raise ValueError(f"length must be N, LO-HI or exp:MEAN (>= 1), got {spec!r}") from None
        if not 1 <= lo <= hi:
            raise ValueError(f"length needs 1 <= LO <= HI, got {spec!r}")
        return cls("uniform", lo, hi)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "exp":
            return min(self.hi, max(1, round(rng.expovariate(1 / self.mean))))
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        if self.kind == "exp":
            return f"exp:{self.mean:g}"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class LoadSpec:
    adapters: tuple[str, ...]  # BASE for the base model
    rate: float | None = None  # requests/s, Poisson arrivals (open loop)
    concurrency: int | None = None  # requests in flight (closed loop); exactly one of the two
    duration_s: float = 60.0  # no request is sent after this
    max_requests: int | None = None  # and no more than this many
    popularity: str = "uniform"  # uniform | zipf
    zipf_alpha: float = 1.0  # P(i-th adapter) ~ 1 / i**alpha, in the order given
    prompt_len: Lengths = Lengths("uniform", 32, 32)
    output_len: Lengths = Lengths("uniform", 32, 32)
    seed: int = 0
    timeout_s: float | None = None  # per request

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ValueError("give at least one adapter (or 'base')")
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.duration_s > 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if self.popularity not in ("uniform", "zipf"):
            raise ValueError(f"popularity must be uniform or zipf, got {self.popularity!r}")
        if not self.zipf_alpha > 0:
            raise ValueError(f"zipf alpha must be > 0, got {self.zipf_alpha}")

    def weights(self) -> list[float]:
        if self.popularity == "uniform":
            return [1.0] * len(self.adapters)
        return [1 / (i + 1) ** self.zipf_alpha for i in range(len(self.adapters))]


@dataclass(frozen=True)
class Planned:
    index: int
    at_s: float  # offset from the start (open loop); 0 in closed loop
    adapter: str
    prompt: str
    max_new_tokens: int


def plan(spec: LoadSpec) -> Iterator[Planned]:
    """The requests of a run, in order; the same spec gives the same requests."""
    rng = random.Random(spec.seed)
    weights = spec.weights()
    t = 0.0
    for i in range(spec.max_requests or 1 << 62):
        if spec.rate is not None:
            t += rng.expovariate(spec.rate)
            if t > spec.duration_s:
                return
        adapter = rng.choices(spec.adapters, weights)[0]
        words = rng.choices(WORDS, k=spec.prompt_len.sample(rng))
        yield Planned(i, t, adapter, " ".join(words), spec.output_len.sample(rng))


@dataclass
class Record:
    index: int
    adapter: str
    kind: str = "unknown"  # the server's adapter_kind for the request
    sent_s: float = 0.0  # offset from the start of the run
    status: str = "OK"  # or the gRPC status code name
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    server_ttft_s: float | None = None
    server_queue_s: float | None = None


async def send(client: AsyncClient, p: Planned, t0: float, timeout: float | None) -> Record:
    rec = Record(p.index, p.adapter, sent_s=time.perf_counter() - t0)
    sent = time.perf_counter()
    last = None
    sampling = Sampling(max_new_tokens=p.max_new_tokens, ignore_eos=True)
    try:
        stream = client.generate_stream(p.prompt, adapter=None if p.adapter == BASE else p.adapter,
                                        sampling=sampling, request_id=f"bench-{p.index}",
                                        timeout=timeout)
        async for chunk in stream:
            now = time.perf_counter()
            rec.kind = chunk.adapter_kind or rec.kind
            if chunk.timings is not None and chunk.timings.ttft_s is not None:
                rec.server_ttft_s = chunk.timings.ttft_s
                rec.server_queue_s = chunk.timings.queue_s
            n = len(chunk.token_ids)
            if n:
                if last is None:
                    rec.ttft_s = now - sent
                else:
                    rec.itl_s.extend([(now - last) / n] * n)
                last = now
            if chunk.finish_reason is not None:
                rec.prompt_tokens = chunk.prompt_tokens or 0
                rec.completion_tokens = chunk.completion_tokens or 0
        rec.e2e_s = time.perf_counter() - sent
    except ApiError as e:
        rec.status = e.code.name
    return rec


async def run_load(client: AsyncClient, spec: LoadSpec,
                   progress: bool = False) -> tuple[list[Record], float]:
    """Runs the spec; returns the records (in request order) and the wall time from the start
    to the last answer."""
    t0 = time.perf_counter()
    requests = plan(spec)
    records: list[Record] = []
    done = 0

    def finished(rec: Record) -> Record:
        nonlocal done
        done += 1
        if progress and done % 10 == 0:
            print(f"\r{done} requests answered, {time.perf_counter() - t0:.0f} s", end="",
                  file=sys.stderr, flush=True)
        return rec

    async def one(p: Planned) -> Record:
        return finished(await send(client, p, t0, spec.timeout_s))

    if spec.rate is not None:
        tasks = []
        for p in requests:
            delay = t0 + p.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(p)))
        records = list(await asyncio.gather(*tasks))
    else:
        deadline = t0 + spec.duration_s

        async def worker() -> None:
            for p in requests:  # one shared iterator: each request goes to one worker
                if time.perf_counter() > deadline:
                    return
                records.append(await one(p))

        assert spec.concurrency is not None
        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        records.sort(key=lambda r: r.index)
    wall = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    return records, wall


# --- report -----------------------------------------------------------------------------------

def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds (nearest rank), and the mean; None when empty."""
    if not values:
        return {**{f"p{q}_ms": None for q in PERCENTILES}, "mean_ms": None}
    s = sorted(values)
    out: dict[str, float | None] = {
        f"p{q}_ms": round(s[min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1)] * 1e3, 2)
        for q in PERCENTILES}
    out["mean_ms"] = round(statistics.fmean(s) * 1e3, 2)
    return out


def latency_summary(records: Sequence[Record]) -> dict[str, object]:
    ok = [r for r in records if r.status == "OK"]
    return {
        "requests": len(records),
        "ok": len(ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "ttft": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "inter_token": percentiles([x for r in ok for x in r.itl_s]),
        "e2e": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


def report(spec: LoadSpec, records: Sequence[Record], wall_s: float) -> dict[str, object]:
    ok = [r for r in records if r.status == "OK"]
    by_kind: dict[str, list[Record]] = defaultdict(list)
    by_adapter: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
        by_adapter[r.adapter].append(r)
    spec_json = {**asdict(spec), "prompt_len": str(spec.prompt_len),
                 "output_len": str(spec.output_len)}
    if len(spec.adapters) > 50:
        head = ", ".join(spec.adapters[:5])
        spec_json["adapters"] = f"{len(spec.adapters)} adapters: {head}, ..."
    return {
        "spec": spec_json,
        "wall_s": round(wall_s, 3),
        "throughput": {
            "requests_per_s": round(len(ok) / wall_s, 3),
            "output_tokens_per_s": round(sum(r.completion_tokens for r in ok) / wall_s, 2),
            "prompt_tokens_per_s": round(sum(r.prompt_tokens for r in ok) / wall_s, 2),
        },
        "overall": latency_summary(records),
        "by_kind": {k: latency_summary(v) for k, v in sorted(by_kind.items())},
        "by_adapter": {a: latency_summary(v) for a, v in sorted(by_adapter.items())},
        "distinct_adapters": len(by_adapter),
        "errors": dict(Counter(r.status for r in records if r.status != "OK")),
    }


def render(result: dict) -> str:
    """The report as a terminal table: one row overall, one per adapter kind."""
    t = result["throughput"]
    lines = [f"{result['overall']['ok']}/{result['overall']['requests']} requests answered in "
             f"{result['wall_s']:.1f} s: {t['requests_per_s']:.2f} req/s, "
             f"{t['output_tokens_per_s']:.1f} output tok/s, {result['distinct_adapters']} "
             f"distinct adapters",
             f"{'':<18}{'n':>6}  {'TTFT p50/p90/p99 ms':>24}  {'ITL p50/p90/p99 ms':>22}  "
             f"{'e2e p50/p90/p99 ms':>24}"]
    rows = [("overall", result["overall"]), *result["by_kind"].items()]
    for name, s in rows:
        cells = ["/".join("-" if s[m][f"p{q}_ms"] is None else f"{s[m][f'p{q}_ms']:.0f}"
                          for q in PERCENTILES) for m in ("ttft", "inter_token", "e2e")]
        lines.append(f"{name:<18}{s['ok']:>6}  {cells[0]:>24}  {cells[1]:>22}  {cells[2]:>24}")
    if result["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in result["errors"].items()))
    check = result.get("server_cross_check")
    if check:
        bad = [k for k, v in check.items() if not v["count_match"]]
        worst = max((abs(v["client_minus_server_mean_ms"] or 0) for k, v in check.items()
                     if k.startswith("ttft")), default=0.0)
        counts = "match" if not bad else "DIFFER: " + ", ".join(bad)
        lines.append(f"server cross-check: counts {counts}; "
                     f"client TTFT mean - server TTFT mean <= {worst:.1f} ms per kind")
    return "\n".join(lines)


# --- the server's own view ----------------------------------------------------------------------

HISTOGRAMS = {"ttft": "peftserve_request_ttft_seconds",
              "inter_token": "peftserve_request_inter_token_seconds",
              "e2e": "peftserve_request_e2e_seconds"}


def scrape(url: str, timeout: float = 10.0) -> dict[tuple[str, str], dict[str, object]]:
    """The server's latency histograms summed over adapters: (metric, adapter_kind) ->
    {"buckets": {le: cumulative count}, "sum": s, "count": n}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user's URL)
        text = resp.read().decode()
    names = {v: k for k, v in HISTOGRAMS.items()}
    out: dict[tuple[str, str], dict[str, object]] = {}
    for family in text_string_to_metric_families(text):
        metric = names.get(family.name)
        if metric is None:
            continue
        for s in family.samples:
            h = out.setdefault((metric, s.labels["adapter_kind"]),
                               {"buckets": defaultdict(float), "sum": 0.0, "count": 0.0})
            if s.name.endswith("_bucket"):
                h["buckets"][float(s.labels["le"])] += s.value  # type: ignore[index]
            elif s.name.endswith("_sum"):
                h["sum"] += s.value  # type: ignore[operator]
            elif s.name.endswith("_count"):
                h["count"] += s.value  # type: ignore[operator]
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if math.isinf(b):
                return prev_bound
            width = buckets[b] - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / width if width else 1)
        prev_bound, prev_count = b, buckets[b]
    return prev_bound


def cross_check(before: dict, after: dict, records: Sequence[Record]) -> dict[str, object]:
    """Server-side counts, means and p50/p90/p99 (bucket-interpolated) over the run, next to the
    client's; the client's latencies include the transport, so they sit at or above the
    server's. `count_match` says every answered request was seen by both sides."""
    ok = [r for r in records if r.status == "OK"]
    client_values = {
        "ttft": lambda rs: [r.ttft_s for r in rs if r.ttft_s is not None],
        "inter_token": lambda rs: [x for r in rs for x in r.itl_s],
        "e2e": lambda rs: [r.e2e_s for r in rs if r.e2e_s is not None],
    }
    out: dict[str, object] = {}
    for (metric, kind), h in sorted(after.items()):
        b = before.get((metric, kind), {"buckets": {}, "sum": 0.0, "count": 0.0})
        count = h["count"] - b["count"]
        if count <= 0:
            continue
        buckets = {le: c - b["buckets"].get(le, 0.0) for le, c in h["buckets"].items()}
        mine = client_values[metric]([r for r in ok if r.kind == kind])
        server = {f"p{q}_ms": _ms(histogram_quantile(q / 100, buckets)) for q in PERCENTILES}
        server["mean_ms"] = _ms((h["sum"] - b["sum"]) / count)
        client = percentiles(mine)
        out[f"{metric}/{kind}"] = {
            "server_count": int(count), "client_count": len(mine),
            "count_match": int(count) == len(mine),
            "server": server, "client": client,
            "client_minus_server_mean_ms": (round(client["mean_ms"] - server["mean_ms"], 2)
                                            if client["mean_ms"] is not None else None),
        }
    return out


def record_json(r: Record) -> dict[str, object]:
    """One request for the JSON file: its inter-token gaps as count and mean only."""
    out = {k: v for k, v in asdict(r).items() if k != "itl_s"}
    out["itl_count"] = len(r.itl_s)
    out["itl_mean_s"] = statistics.fmean(r.itl_s) if r.itl_s else None
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


async def bench(target: str, spec: LoadSpec, metrics_url: str | None = None,
                progress: bool = False, **client_options: object) -> dict[str, object]:
    """One run against the server at `target`: the report, with the cross-check when the
    server's metrics URL is given."""
    async with AsyncClient(target, **client_options) as client:  # type: ignore[arg-type]
        known = {a.name for a in await client.list_adapters()}
        missing = [a for a in spec.adapters if a != BASE and a not in known]
        if missing:
            raise ValueError(f"not registered on {target}: {', '.join(missing[:10])}")
        before = scrape(metrics_url) if metrics_url else None
        records, wall = await run_load(client, spec, progress)
        result = report(spec, records, wall)
        if metrics_url:
            await asyncio.sleep(0.2)  # the last observations happen as the streams close
            result["server_cross_check"] = cross_check(before, scrape(metrics_url), records)
        result["records"] = [record_json(r) for r in records]
        return result
