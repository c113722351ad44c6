"""The method table, measured: every adapter method trained with `peftserve train` on the same
demo task (sentiment, SmolLM2-135M-Instruct), then served by the real server.

    .venv/bin/python -m bench.method_table --runs /work/runs/sentiment   # trained adapters there
    .venv/bin/python -m bench.method_table --runs DIR --train            # train what is missing

`--runs DIR` holds one `peftserve train --demo sentiment` output per method: lora, adapter
(Pfeiffer), houlsby (`--method adapter --architecture houlsby`), prefix, prompt; `--train` runs
`peftserve train` (its defaults) for any that is missing. Two rows need no training: a prompt
template (a system prompt and three few-shot turns from the training split: no parameters) and
the trained LoRA merged into the base weights (PEFT merge_and_unload), served as a plain model.

Per row: trainable parameters (% of base), adapter bytes on disk, serving memory (the weights in
the serving dtype plus KV blocks the adapter holds while idle), TTFT and inter-token latency
against the base model on the same requests at 1 and at 16 requests in flight (`peftserve
bench`'s load generator, closed loop), and held-out exact match (60 items) scored by the engine
in fp32. The base model is measured first and last; its two runs show the machine's drift.
Writes results/method_table.json and results/method_table.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import environment
from bench.latency_by_kind import merge, warm
from peftserve.client import Client
from peftserve.client import loadgen as L
from peftserve.models.loader import resolve_model_dir
from peftserve.train import scoring
from peftserve.train.config import TrainConfig
from peftserve.train.run import train
from peftserve.train.tasks import get_task
from tests.e2e.server_process import ServerProcess

RESULTS = Path(__file__).parent / "results"
TRAINED = {  # row -> (run directory name, TrainConfig overrides)
    "lora (r8, q,v)": ("lora", {"method": "lora"}),
    "adapter, Houlsby (rf 16)": ("houlsby", {"method": "adapter", "architecture": "houlsby"}),
    "adapter, Pfeiffer (rf 16)": ("adapter", {"method": "adapter"}),
    "prefix tuning (20 tokens)": ("prefix", {"method": "prefix"}),
    "prompt tuning (20 tokens)": ("prompt", {"method": "prompt"}),
}
TEMPLATE = "prompt template (3-shot)"
MERGED = "lora merged into the base"
LOADS = {"1 in flight": (1, 16), "16 in flight": (16, 48)}  # concurrency, requests


def ensure_trained(runs: Path, do_train: bool) -> dict[str, Path]:
    out = {}
    for row, (name, overrides) in TRAINED.items():
        d = runs / name
        if not (d / "metrics.json").exists():
            if not do_train:
                raise SystemExit(f"{d} has no trained adapter: run with --train (or "
                                 f"`peftserve train --demo sentiment ... --out {d}`)")
            train(TrainConfig(demo="sentiment", out=d, **overrides))
        out[row] = d
    return out


def make_template(out: Path) -> Path:
    """Three training-split items (one per label) as few-shot turns; the task's own system
    prompt comes with each request."""
    task = get_task("sentiment")
    train_items, _ = task.split(200, 60)
    shots, seen = [], set()
    for item in train_items:
        if item.target not in seen:
            seen.add(item.target)
            shots.append({"user": item.user, "assistant": item.answer})
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(
        {"peftserve_type": "PROMPT_TEMPLATE", "system": None, "few_shot": shots,
         "chain_of_thought": None}))
    return out


def accuracy(model_dir: Path, adapters: dict[str, Path]) -> dict[str, float]:
    """Held-out exact match per adapter name (None = base), served by the engine in fp32."""
    task = get_task("sentiment")
    _, held_out = task.split(200, 60)
    engine = scoring.make_engine(model_dir)
    for name, path in adapters.items():
        engine.adapters.register(name, path)
    return {name: scoring.exact_match(engine, task, held_out, adapter=name).accuracy
            for name in [None, *adapters]}


def latency(server: ServerProcess, adapter: str, concurrency: int, requests: int) -> dict:
    warm(server.target, (adapter,))
    spec = L.LoadSpec(adapters=(adapter,), concurrency=concurrency, max_requests=requests,
                      duration_s=3600, prompt_len=L.Lengths.parse("32-64"),
                      output_len=L.Lengths.parse("32"), seed=0)
    r = asyncio.run(L.bench(server.target, spec))
    if r["errors"]:
        raise RuntimeError(f"{adapter}: {r['errors']}")
    return {k: r["overall"][k]["p50_ms"] for k in ("ttft", "inter_token", "e2e")} | {
        "output_tokens_per_s": r["throughput"]["output_tokens_per_s"]}


def measure_server(server: ServerProcess, names: list[str]) -> dict[str, dict]:
    """Latencies per load for each name (base first and last), and idle KV blocks held."""
    out: dict[str, dict] = {name: {} for name in names}
    # KV blocks an adapter keeps while idle (a prefix's or template's shared blocks): each one's
    # first request adds them, before any latency run has touched it.
    with Client(server.target, timeout=600) as c:
        held = c.server_info().load.kv_blocks_used
        for name in names:
            warm(server.target, (name,))
            now = c.server_info().load.kv_blocks_used
            out[name]["kv_blocks_held_idle"], held = now - held, now
    for load, (conc, n) in LOADS.items():
        for i, name in enumerate([L.BASE, *names, L.BASE]):
            key = "base (second run)" if name == L.BASE and i else name
            out.setdefault(key, {})[load] = latency(server, name, conc, n)
            print(f"{load:>13} {key:<28} {out[key][load]}", flush=True)
    return out


def kv_block_bytes(model_dir: Path, dtype_bytes: int, block_size: int = 16) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return block_size * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * dtype_bytes


def render(result: dict) -> str:
    rows = result["rows"]
    head = ("| method | trainable params (% of base) | adapter bytes | serving memory | "
            "TTFT vs base, 1 / 16 in flight | inter-token vs base, 1 / 16 in flight | "
            "held-out exact match |")
    lines = [head, "|" + "---|" * 7]
    for name, r in rows.items():
        pct = r["trainable_percent"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} ({pct:.3f}%) | {_size(r['adapter_bytes'])} | "
            f"{_size(r['serving_bytes'])} | "
            + " / ".join(f"{r['vs_base'][ld]['ttft']:.2f}x" for ld in LOADS) + " | "
            + " / ".join(f"{r['vs_base'][ld]['inter_token']:.2f}x" for ld in LOADS) + " | "
            + f"{r['accuracy']:.1%} |")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="trained adapters, one per method")
    ap.add_argument("--train", action="store_true", help="train the methods missing in --runs")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir("default")
    trained = ensure_trained(args.runs, args.train)
    work = Path(tempfile.mkdtemp(prefix="peftserve-table-"))
    root = work / "adapters"
    names = {}
    for row, d in trained.items():
        names[row] = d.name
        shutil.copytree(d, root / d.name)
    names[TEMPLATE] = "template"
    make_template(root / "template")
    merged = merge(model_dir, trained["lora (r8, q,v)"], work / "merged", torch.float32)

    acc = accuracy(model_dir, {names[r]: root / names[r] for r in names})
    acc_merged = accuracy(merged, {})[None]
    print("accuracy", acc, "merged", acc_merged, flush=True)

    common = ["--dtype", args.dtype, "--num-threads", str(args.threads), "--max-num-seqs", "64"]
    server = ServerProcess(["--model", "default", "--adapter-root", str(root), *common],
                           work / "server.log").start()
    try:
        with Client(server.target, timeout=600) as c:
            info = c.server_info()
            adapters = {row: c.register_adapter(names[row], names[row]) for row in names}
        measured = measure_server(server, list(names.values()))
    finally:
        server.terminate()
    merged_bf = work / "merged-serving"
    dtype = torch.bfloat16 if info.dtype == "bfloat16" else torch.float32
    merge(model_dir, trained["lora (r8, q,v)"], merged_bf, dtype)
    server = ServerProcess(["--model", str(merged_bf), *common], work / "merged.log").start()
    try:
        merged_lat = {ld: latency(server, L.BASE, c, n) for ld, (c, n) in LOADS.items()}
    finally:
        server.terminate()

    dtype_bytes = 2 if info.dtype in ("bfloat16", "float16") else 4
    block = kv_block_bytes(model_dir, dtype_bytes)
    base_params = json.loads((trained["lora (r8, q,v)"] / "metrics.json").read_text())[
        "base_params"]

    def base_lat(load: str, key: str) -> float:
        return (measured[L.BASE][load][key] + measured["base (second run)"][load][key]) / 2

    def vs_base(lat: dict) -> dict:
        return {ld: {k: round(lat[ld][k] / base_lat(ld, k), 3) for k in ("ttft", "inter_token")}
                for ld in LOADS}

    rows: dict[str, dict] = {}
    for row, name in names.items():
        a = adapters[row]
        files = [p for p in (root / name).iterdir()
                 if p.name in ("adapter_config.json", "adapter_model.safetensors")]
        held = measured[name]["kv_blocks_held_idle"]
        rows[row] = {
            "adapter": name, "kind": a.kind, "trainable_params": a.num_params,
            "trainable_percent": 100 * a.num_params / base_params,
            "adapter_bytes": sum(p.stat().st_size for p in files),
            "kv_blocks_held_idle": held,
            # Prefix tuning's parameters are its KV: counted once, as the blocks holding them.
            "serving_bytes": (0 if a.kind == "prefix_tuning" else a.num_params * dtype_bytes)
            + held * block,
            "latency_p50_ms": {ld: measured[name][ld] for ld in LOADS},
            "vs_base": vs_base({ld: measured[name][ld] for ld in LOADS}),
            "accuracy": acc[name],
        }
    lora_row = rows["lora (r8, q,v)"]
    rows[MERGED] = {
        "adapter": None, "kind": "merged", "trainable_params": lora_row["trainable_params"],
        "trainable_percent": lora_row["trainable_percent"], "adapter_bytes": 0,
        "kv_blocks_held_idle": 0, "serving_bytes": 0, "latency_p50_ms": merged_lat,
        "vs_base": vs_base(merged_lat), "accuracy": acc_merged,
    }
    result = {
        "environment": environment(), "dtype": info.dtype, "base_params": base_params,
        "base_accuracy": acc[None], "kv_block_bytes": block,
        "base_latency_p50_ms": {k: measured[k] for k in (L.BASE, "base (second run)")},
        "rows": rows,
        "workload": "closed loop, prompts 32-64 words, 32 output tokens (EOS ignored), seed 0; "
                    + ", ".join(f"{ld}: {n} requests" for ld, (_, n) in LOADS.items()),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "method_table.json").write_text(json.dumps(result, indent=1) + "\n")
    table = render(result)
    (args.out_dir / "method_table.md").write_text(table + "\n")
    print(table)
    print(f"base model held-out exact match {acc[None]:.1%}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
