"""Scale run on Ray Serve: `python -m bench.scale --ray --replicas 2`.

    .venv/bin/python -m bench.scale --ray --replicas 2 --rate 1 --duration 60

LoRA r8 on q,v of SmolLM2 (random weights), registered by path. The same Zipf request stream
(alpha 1 over `--adapters`, Poisson `--rate`, prompts 16..64 words, 16..64 output tokens) goes
first to `peftserve serve --ray` with `--replicas` engine replicas (`--adapters-per-replica`
each in Ray Serve's multiplexed LRU, `--threads` torch threads and Ray CPUs each), then to one
`peftserve serve` with the same engine settings. Before each, a warm-up stream (another seed)
runs through.

Reported: routing affinity (requests that reached a replica already holding their adapter,
from the replicas' peftserve_routed_requests_total) for the warm-up and the measured run; cold
loads per replica (requests that found their adapter cold there, and the engine's disk loads);
which replica held which adapter at the end; TTFT / e2e p50/p99 and errors for both servers.
On 2 cores the replicas share the cores a single server has to itself: routing and correctness
are the point of this run, not throughput. Writes results/scale_ray.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

from bench.common import environment
from bench.multi_adapter import QV, write_lora
from peftserve.client import Client
from peftserve.client import loadgen as L
from peftserve.models.llama import ModelShape
from peftserve.models.loader import resolve_model_dir
from tests.e2e.server_process import ServerProcess, scrape

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_replica(url: str, name: str, label: str | None = None) -> dict[str, dict[str, float]]:
    """{replica: {label value (or ""): value}} of one metric."""
    out: dict[str, dict[str, float]] = {}
    for (n, labels), v in scrape(url).items():
        if n == name:
            ls = dict(labels)
            out.setdefault(ls["replica"], {})[ls.get(label, "") if label else ""] = v
    return out


def routed(url: str) -> dict[str, dict[str, float]]:
    return per_replica(url, "peftserve_routed_requests_total", "adapter_resident")


def affinity(before: dict, after: dict) -> dict[str, object]:
    def total(d: dict, k: str) -> float:
        return sum(v.get(k, 0.0) for v in d.values())

    hits = total(after, "true") - total(before, "true")
    misses = total(after, "false") - total(before, "false")
    cold = {r: after[r].get("false", 0.0) - before.get(r, {}).get("false", 0.0) for r in after}
    return {"adapter_requests": int(hits + misses), "on_warm_replica": int(hits),
            "affinity": round(hits / (hits + misses), 3) if hits + misses else None,
            "cold_requests_per_replica": {r: int(v) for r, v in sorted(cold.items())}}


def run(server: ServerProcess, spec: L.LoadSpec) -> dict:
    r = asyncio.run(L.bench(server.target, spec, None, progress=False))
    print(L.render(r), flush=True)
    return r


def summary(r: dict) -> dict:
    return {k: r[k] for k in ("throughput", "overall", "errors")}


def main(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    model_dir = resolve_model_dir("default")
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    work = Path(tempfile.mkdtemp(prefix="peftserve-scale-ray-"))
    root = work / "adapters"
    names = [f"a{i:03d}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        write_lora(root / name, shape, 8, QV, seed=i)
    engine_args = ["--model", "default", "--adapter-root", str(root), "--dtype", args.dtype,
                   "--num-threads", str(args.threads), "--max-lora-rank", "8",
                   "--max-loras", str(args.adapters_per_replica)]
    toml = work / "serve.toml"
    toml.write_text(f"[ray]\nreplicas = {args.replicas}\ncpus_per_replica = {args.threads}\n"
                    f"adapters_per_replica = {args.adapters_per_replica}\n"
                    f"grpc_port = {free_port()}\nhttp_port = {free_port()}\n")
    common = {"rate": args.rate, "duration_s": args.duration, "popularity": "zipf",
              "prompt_len": L.Lengths.parse("16-64"), "output_len": L.Lengths.parse("16-64"),
              "adapters": tuple(names)}
    warmup = L.LoadSpec(seed=1, **{**common, "duration_s": args.warmup})
    measured = L.LoadSpec(seed=0, **common)

    ray_server = ServerProcess([*engine_args, "--ray", "--config", str(toml)],
                               work / "ray.log").start()
    try:
        t0 = time.perf_counter()
        with Client(ray_server.target, timeout=600) as c:
            for name in names:
                c.register_adapter(name, name)
        register_s = time.perf_counter() - t0
        start = routed(ray_server.metrics_url)
        run(ray_server, warmup)
        time.sleep(1.0)  # the replicas report every 0.5 s
        warm = routed(ray_server.metrics_url)
        loads_before = per_replica(ray_server.metrics_url, "peftserve_adapter_loads_total")
        ray_result = run(ray_server, measured)
        time.sleep(1.0)
        end = routed(ray_server.metrics_url)
        loads_after = per_replica(ray_server.metrics_url, "peftserve_adapter_loads_total")
        held = per_replica(ray_server.metrics_url, "peftserve_adapter_on_replica", "adapter")
        with Client(ray_server.target) as c:
            info = c.server_info()
    finally:
        stopped = ray_server.terminate(timeout=120)
    single = ServerProcess(engine_args, work / "single.log").start()
    try:
        with Client(single.target, timeout=600) as c:
            for name in names:
                c.register_adapter(name, name)
        run(single, warmup)
        single_result = run(single, measured)
    finally:
        single.terminate()

    result = {
        "environment": environment(),
        "dtype": info.dtype,
        "config": {"replicas": args.replicas, "adapters": args.adapters,
                   "adapters_per_replica": args.adapters_per_replica,
                   "threads_per_replica": args.threads, "rate_req_s": args.rate,
                   "warmup_s": args.warmup, "duration_s": args.duration,
                   "adapter": "LoRA r8 on q,v", "popularity": "zipf alpha 1"},
        "register_all_s": round(register_s, 2),
        "affinity_warmup": affinity(start, warm),
        "affinity_measured": affinity(warm, end),
        "engine_disk_loads_in_measured_run": {
            r: int(v.get("", 0) - loads_before.get(r, {}).get("", 0))
            for r, v in sorted(loads_after.items())},
        "adapters_held_at_end": {r: sorted(a for a, v in h.items() if v == 1)
                                 for r, h in sorted(held.items())},
        "ray": summary(ray_result),
        "single_server": summary(single_result),
        "ray_exit_status": stopped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("ray", "single_server")},
                     indent=1))
    for name in ("ray", "single_server"):
        o = result[name]["overall"]
        print(f"{name}: ttft {o['ttft']} e2e {o['e2e']} errors {result[name]['errors']}")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ray", action="store_true",
                    help="run on Ray Serve against one server (see bench/scale_ray.py)")
    ap.add_argument("--replicas", type=int, default=2, help="--ray: engine replicas")
    ap.add_argument("--adapters-per-replica", type=int, default=8,
                    help="--ray: Ray Serve's multiplexed LRU per replica (and device slots)")
    ap.add_argument("--warmup", type=float, default=30.0, help="--ray: warm-up seconds")
