"""Scale run: 1,000 registered LoRA adapters, Zipf traffic, against a real server.

    .venv/bin/python -m bench.scale                       # 1000 adapters, 128 slots, 90 s each
    .venv/bin/python -m bench.scale --adapters 200 --duration 30
    .venv/bin/python -m bench.scale --ray --replicas 2    # on Ray Serve (bench/scale_ray.py)

Every adapter is a rank-8 LoRA on q,v of SmolLM2 (random weights, 1.8 MB of fp32 safetensors),
registered by path over gRPC. The server holds `--slots` device slots and an LRU host tier of
`--host` adapters; the rest stay on disk. `peftserve bench`'s load generator sends Poisson
arrivals at `--rate` req/s for `--duration` s, each request naming adapter i with probability
~ 1/i (Zipf, alpha 1), prompts 16..64 words, 16..64 output tokens. The same arrivals are sent
twice: once all naming a single adapter (the baseline), once Zipf over all of them.

Reported: throughput, TTFT / inter-token / e2e p50/p99 for both; the number of distinct adapters
named; cold loads (the server's per-adapter load time, GetAdapter.load_seconds) p50/p99 and the
TTFT of requests whose adapter was first named then against the rest; registration time; the
server's resident memory (VmRSS, VmHWM) after registering and after the run. Writes
results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import scale_ray
from bench.common import environment
from bench.latency_by_kind import warm
from bench.multi_adapter import QV, write_lora
from peftserve.client import Client
from peftserve.client import loadgen as L
from peftserve.models.llama import ModelShape
from peftserve.models.loader import resolve_model_dir
from tests.e2e.server_process import ServerProcess

RESULTS = Path(__file__).parent / "results"


def memory(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def run(server: ServerProcess, spec: L.LoadSpec) -> dict:
    r = asyncio.run(L.bench(server.target, spec, server.metrics_url, progress=True))
    print(L.render(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=None, help="1000 (--ray: 32)")
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--host", type=int, default=256, help="host-tier LRU size")
    ap.add_argument("--rate", type=float, default=1.5, help="requests/s")
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=None, help="2 (--ray: 1 per replica)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=None,
                    help="results/scale.json (--ray: results/scale_ray.json)")
    scale_ray.add_arguments(ap)
    args = ap.parse_args()
    if args.ray:
        args.adapters = args.adapters or 32
        args.threads = args.threads or 1
        args.out = args.out or RESULTS / "scale_ray.json"
        return scale_ray.main(args)
    args.adapters = args.adapters or 1000
    args.threads = args.threads or 2
    args.out = args.out or RESULTS / "scale.json"
    from transformers import AutoConfig

    model_dir = resolve_model_dir("default")
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    work = Path(tempfile.mkdtemp(prefix="peftserve-scale-"))
    root = work / "adapters"
    names = [f"a{i:04d}" for i in range(args.adapters)]
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        write_lora(root / name, shape, 8, QV, seed=i)
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {args.adapters} adapters ({disk / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    server = ServerProcess(
        ["--model", "default", "--adapter-root", str(root), "--dtype", args.dtype,
         "--num-threads", str(args.threads), "--max-loras", str(args.slots),
         "--max-lora-rank", "8", "--max-cpu-adapters", str(args.host), "--max-num-seqs", "64"],
        work / "server.log").start()
    assert server.proc is not None
    try:
        mem_start = memory(server.proc.pid)
        t0 = time.perf_counter()
        with Client(server.target, timeout=600) as c, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: c.register_adapter(n, n), names))
        register_s = time.perf_counter() - t0
        mem_registered = memory(server.proc.pid)
        print(f"registered {len(names)} in {register_s:.1f} s; memory {mem_registered}",
              flush=True)
        common = {"rate": args.rate, "duration_s": args.duration, "seed": 0,
                  "prompt_len": L.Lengths.parse("16-64"), "output_len": L.Lengths.parse("16-64")}
        warm(server.target, (names[0],))
        single = run(server, L.LoadSpec(adapters=(names[0],), **common))
        zipf_spec = L.LoadSpec(adapters=tuple(names), popularity="zipf", zipf_alpha=1.0,
                               **common)
        with Client(server.target, timeout=600) as c:
            before = {a.name: a.load_seconds for a in c.list_adapters()}
        many = run(server, zipf_spec)
        mem_end = memory(server.proc.pid)
        with Client(server.target, timeout=600) as c:
            infos = {a.name: a for a in c.list_adapters()}
            server_info = c.server_info()
    finally:
        server.terminate()
    # A disk load records its time on the adapter: the ones that changed were loaded during
    # the Zipf run (the last load of each, if several).
    loads = [a.load_seconds for a in infos.values()
             if a.load_seconds is not None and a.load_seconds != before.get(a.name)]
    seen: set[str] = set()
    cold_ttft, warm_ttft = [], []
    for rec in many["records"]:  # in request order: the first request naming an adapter
        if rec["ttft_s"] is None:
            continue
        (warm_ttft if rec["adapter"] in seen else cold_ttft).append(rec["ttft_s"])
        seen.add(rec["adapter"])
    residency: dict[str, int] = {}
    for a in infos.values():
        residency[a.residency] = residency.get(a.residency, 0) + 1

    # The load generator's percentiles (nearest rank), so that every bench ranks alike.
    load_ms, cold_ms, warm_ms = (L.percentiles(x) for x in (loads, cold_ttft, warm_ttft))

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1e3, 1)

    result = {
        "environment": environment(),
        "dtype": server_info.dtype,
        "config": {"adapters": args.adapters, "device_slots": args.slots,
                   "host_tier": args.host, "rate_req_s": args.rate,
                   "duration_s": args.duration, "adapter": "LoRA r8 on q,v"},
        "adapter_files_mib": round(disk / 2**20, 1),
        "register_all_s": round(register_s, 2),
        "memory_mib": {"started": mem_start, "registered": mem_registered, "after_run": mem_end},
        "single_adapter": {k: single[k] for k in ("throughput", "overall", "errors")},
        "zipf": {k: many[k] for k in ("throughput", "overall", "errors", "distinct_adapters",
                                      "server_cross_check")},
        "zipf_vs_single_throughput": round(many["throughput"]["output_tokens_per_s"]
                                           / single["throughput"]["output_tokens_per_s"], 3),
        "cold_loads": {"adapters_loaded_from_disk_in_run": len(loads),
                       "load_p50_ms": load_ms["p50_ms"], "load_p99_ms": load_ms["p99_ms"],
                       "load_max_ms": ms(max(loads, default=None)),
                       "first_use_ttft_p50_ms": cold_ms["p50_ms"],
                       "first_use_ttft_p99_ms": cold_ms["p99_ms"],
                       "repeat_use_ttft_p50_ms": warm_ms["p50_ms"],
                       "repeat_use_ttft_p99_ms": warm_ms["p99_ms"]},
        "residency_after_run": residency,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("single_adapter", "zipf")},
                     indent=1))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
