"""Latency and throughput of every adapter kind on SmolLM2, through the real server, in one run.

    .venv/bin/python -m bench.latency_by_kind                 # bf16 where the CPU has it, 2 threads
    .venv/bin/python -m bench.latency_by_kind --skip-peft     # without the (slow) PEFT baselines

A `peftserve serve` process with every kind registered; `peftserve bench`'s load generator
(peftserve.client.loadgen) sends the same requests to each configuration: closed loop, 32 in
flight, 64 requests, prompts of 16..64 words, 16..64 output tokens (EOS ignored), seed 0. Only
the adapter named changes between configurations, so every row generates the same tokens:

  base                   no adapter
  lora-r8/r16/r64        one LoRA on all linear layers (q,k,v,o,gate,up,down) at that rank
  houlsby, pfeiffer      bottleneck adapters (reduction factor 16)
  prefix                 prefix tuning, 20 virtual tokens
  prompt                 prompt tuning, 20 virtual tokens
  template               a system prompt and two few-shot turns (no parameters)
  mixed                  base and all of the above, uniformly
  lora-r16-merged        lora-r16 merged into the weights (PEFT merge_and_unload), served as a
                         base model by a second server: LoRA's "no added latency" when merged
  distinct-K             K distinct rank-16 LoRAs over the 64 requests, K = 1..32: throughput vs
                         distinct adapters per batch
  peft-mixed, peft-swap  PEFT on the distinct-32 requests: one generate(adapter_names=...) per
                         batch of 32, and set_adapter + generate per request

All phases run `--repeat` rounds (default 2) in turn and each keeps its fastest round, so that
a slow spell of a shared machine does not land on one configuration. Writes
results/latency_by_kind.json, results/latency_cdf.png (TTFT, inter-token and e2e CDF per
kind) and results/throughput_vs_adapters.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import environment
from bench.multi_adapter import ALL, write_lora
from peftserve.client import Client, Sampling
from peftserve.client import loadgen as L
from peftserve.models.llama import ModelShape
from peftserve.models.loader import resolve_model_dir
from tests import adapters as A
from tests.e2e.server_process import ServerProcess

RESULTS = Path(__file__).parent / "results"
KINDS = ("lora-r8", "lora-r16", "lora-r64", "houlsby", "pfeiffer", "prefix", "prompt",
         "template")
DISTINCT = (1, 2, 4, 8, 16, 32)


def make_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    out = {f"lora-r{r}": write_lora(root / f"lora-r{r}", shape, r, ALL, seed=r)
           for r in (8, 16, 64)}
    out["houlsby"] = A.make_bottleneck(model_dir, root / "houlsby", "houlsby", seed=1)
    out["pfeiffer"] = A.make_bottleneck(model_dir, root / "pfeiffer", "pfeiffer", seed=2)
    out["prefix"] = A.make_prefix_tuning(model_dir, root / "prefix", virtual=20, seed=3)
    out["prompt"] = A.make_prompt_tuning(model_dir, root / "prompt", virtual=20, seed=4)
    out["template"] = A.make_template(
        root / "template", system="You are a helpful assistant. Answer briefly.",
        few_shot=[{"user": "Name a color.", "assistant": "Blue."},
                  {"user": "Name a fruit.", "assistant": "Apple."}])
    for i in range(1, max(DISTINCT)):
        out[f"d{i}"] = write_lora(root / f"d{i}", shape, 16, ALL, seed=100 + i)
    return out


def merge(model_dir: Path, lora: Path, out: Path, dtype: torch.dtype) -> Path:
    """The LoRA folded into the base weights with PEFT, saved as a plain HF model directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, lora).merge_and_unload()
    merged.to(dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def spec(adapters: tuple[str, ...], args: argparse.Namespace) -> L.LoadSpec:
    return L.LoadSpec(adapters=adapters, concurrency=args.concurrency,
                      max_requests=args.requests, duration_s=3600,
                      prompt_len=L.Lengths.parse(args.prompt_len),
                      output_len=L.Lengths.parse(args.output_len), seed=args.seed)


def warm(target: str, adapters: tuple[str, ...]) -> None:
    """One short request per adapter, so that no measured request waits for a load."""
    with Client(target, timeout=600) as c:
        for a in dict.fromkeys(adapters):
            c.generate("warm up", adapter=None if a == L.BASE else a,
                       sampling=Sampling(max_new_tokens=2, ignore_eos=True))


def phase(server: ServerProcess, name: str, adapters: tuple[str, ...],
          args: argparse.Namespace) -> dict:
    warm(server.target, adapters)
    r = asyncio.run(L.bench(server.target, spec(adapters, args), server.metrics_url))
    if r["errors"]:
        raise RuntimeError(f"{name}: errors {r['errors']}")
    t = r["throughput"]
    o = r["overall"]
    print(f"{name:<18} {t['output_tokens_per_s']:7.1f} tok/s  TTFT p50 {o['ttft']['p50_ms']:7.0f}"
          f"  ITL p50 {o['inter_token']['p50_ms']:6.1f}  e2e p50 {o['e2e']['p50_ms']:7.0f} ms",
          flush=True)
    return r


def keep(result: dict, name: str, r: dict) -> None:
    """Records a round of a phase; the phase's reported run is its fastest."""
    tput = r["throughput"]["output_tokens_per_s"]
    result["rounds_tok_s"].setdefault(name, []).append(tput)
    best = result["phases"].get(name)
    if best is None or tput > best["throughput"]["output_tokens_per_s"]:
        result["phases"][name] = r


def peft_baselines(model_dir: Path, paths: dict[str, Path], planned: list[L.Planned],
                   dtype: torch.dtype, concurrency: int, skip_swap: bool) -> dict:
    """PEFT on the same requests (the prompts as the server tokenizes raw text)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    names = sorted({p.adapter for p in planned})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    peft = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        peft.load_adapter(paths[n], adapter_name=n)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [tok(p.prompt)["input_ids"] for p in planned]
    tokens = sum(p.max_new_tokens for p in planned)
    out = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(planned), concurrency):
            batch, chunk = planned[s:s + concurrency], ids[s:s + concurrency]
            width = max(map(len, chunk))
            n = max(p.max_new_tokens for p in batch)
            peft.generate(
                input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in chunk]),
                attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x)
                                             for x in chunk]),
                adapter_names=[p.adapter for p in batch], max_new_tokens=n, min_new_tokens=n,
                do_sample=False, eos_token_id=None, pad_token_id=pad)
    wall = time.perf_counter() - t0
    out["peft-mixed"] = {"wall_s": wall, "output_tokens_per_s": tokens / wall,
                         "how": f"generate(adapter_names=...) per batch of {concurrency}, "
                                "each batch run to its longest output"}
    print(f"{'peft-mixed':<18} {tokens / wall:7.1f} tok/s", flush=True)
    if not skip_swap:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for p, x in zip(planned, ids, strict=True):
                peft.set_adapter(p.adapter)
                peft.generate(input_ids=torch.tensor([x]),
                              attention_mask=torch.ones(1, len(x), dtype=torch.long),
                              max_new_tokens=p.max_new_tokens, min_new_tokens=p.max_new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=pad)
        wall = time.perf_counter() - t0
        out["peft-swap"] = {"wall_s": wall, "output_tokens_per_s": tokens / wall,
                            "how": "set_adapter + generate per request, one at a time"}
        print(f"{'peft-swap':<18} {tokens / wall:7.1f} tok/s", flush=True)
    return out


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result["phases"]
    rows = ["base", *KINDS, "lora-r16-merged"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    metrics = (("ttft_s", "TTFT (ms)"), ("itl_mean_s", "mean inter-token latency per request (ms)"),
               ("e2e_s", "end-to-end latency (ms)"))
    cmap = plt.get_cmap("tab20")
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for i, name in enumerate(rows):
            xs = sorted(r[key] * 1e3 for r in phases[name]["records"] if r[key] is not None)
            ys = [(j + 1) / len(xs) for j in range(len(xs))]
            ax.step(xs, ys, where="post", label=name, color=cmap(i),
                    linewidth=2.5 if name in ("base", "lora-r16-merged") else 1.3,
                    linestyle="--" if name == "lora-r16-merged" else "-")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    env = result["environment"]
    fig.suptitle(f"SmolLM2-135M, {result['dtype']}, {env['cpu']} ({env['threads']} threads): "
                 f"{result['workload']}")
    fig.tight_layout()
    cdf = out_dir / "latency_cdf.png"
    fig.savefig(cdf, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = list(DISTINCT)
    tps = [phases[f"distinct-{k}"]["throughput"]["output_tokens_per_s"] for k in ks]
    ax.plot(ks, tps, "o-", label="peftserve, rank-16 LoRAs (all linear)")
    ax.axhline(phases["base"]["throughput"]["output_tokens_per_s"], color="gray", ls="--",
               label="peftserve, base model")
    for name, marker in (("peft-mixed", "s"), ("peft-swap", "v")):
        if name in result["baselines"]:
            ax.plot([ks[-1]], [result["baselines"][name]["output_tokens_per_s"]], marker,
                    markersize=9, label=f"PEFT {name.split('-')[1]} (same requests)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel(f"distinct adapters among the requests ({result['concurrency']} in flight)")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tput = out_dir / "throughput_vs_adapters.png"
    fig.savefig(tput, dpi=110)
    plt.close(fig)
    return [cdf, tput]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="16-64")
    ap.add_argument("--output-len", default="16-64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="rounds over all phases; best kept")
    ap.add_argument("--only", default=None, help="comma-separated phases (a partial run: "
                    "no plots, no merged or PEFT rows)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-peft-swap", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir("default")
    work = Path(tempfile.mkdtemp(prefix="peftserve-kinds-"))
    paths = make_adapters(model_dir, work / "adapters")
    common = ["--dtype", args.dtype, "--num-threads", str(args.threads), "--max-num-seqs", "64",
              "--max-loras", "32", "--max-lora-rank", "64", "--max-cpu-adapters", "64"]
    result: dict = {"environment": environment(), "phases": {}, "baselines": {},
                    "rounds_tok_s": {}, "repeat": args.repeat,
                    "concurrency": args.concurrency,
                    "workload": f"{args.requests} requests, {args.concurrency} in flight, "
                                f"prompts {args.prompt_len} words, outputs {args.output_len} "
                                "tokens"}
    server = ServerProcess(["--model", "default", "--adapter-root", str(work / "adapters"),
                            *common], work / "server.log").start()
    try:
        with Client(server.target, timeout=600) as c:
            result["dtype"] = c.server_info().dtype
            for name in paths:
                c.register_adapter(name, name)
        phases = {"base": (L.BASE,), **{k: (k,) for k in KINDS},
                  "mixed": (L.BASE, *KINDS)}
        sweep = ("lora-r16", *(f"d{i}" for i in range(1, max(DISTINCT))))
        phases.update({f"distinct-{k}": sweep[:k] for k in DISTINCT})
        if args.only:
            phases = {k: v for k, v in phases.items() if k in args.only.split(",")}
        # Rounds over all phases, so that a slow spell of the machine hits every phase alike;
        # each phase keeps its best-throughput round (all rounds' numbers are recorded).
        for _ in range(args.repeat):
            for name, adapters in phases.items():
                keep(result, name, phase(server, name, adapters, args))
    finally:
        server.terminate()
    if args.only:
        print(json.dumps({k: r["throughput"] for k, r in result["phases"].items()}))
        return
    merged = merge(model_dir, paths["lora-r16"], work / "merged",
                   torch.bfloat16 if result["dtype"] == "bfloat16" else torch.float32)
    server = ServerProcess(["--model", str(merged), *common], work / "merged.log").start()
    try:
        for _ in range(args.repeat):
            keep(result, "lora-r16-merged", phase(server, "lora-r16-merged", (L.BASE,), args))
    finally:
        server.terminate()
    if not args.skip_peft:
        planned = list(L.plan(spec(sweep, args)))
        dtype = torch.bfloat16 if result["dtype"] == "bfloat16" else torch.float32
        result["baselines"] = peft_baselines(model_dir, paths, planned, dtype, args.concurrency,
                                             args.skip_peft_swap)
    base = result["phases"]["base"]
    result["vs_base"] = {}
    for name, r in result["phases"].items():
        ratio = {"throughput": r["throughput"]["output_tokens_per_s"]
                 / base["throughput"]["output_tokens_per_s"]}
        for m in ("ttft", "inter_token", "e2e"):
            ratio[f"{m}_p50"] = r["overall"][m]["p50_ms"] / base["overall"][m]["p50_ms"]
        result["vs_base"][name] = {k: round(v, 3) for k, v in ratio.items()}
    for name, r in result["baselines"].items():
        result["vs_base"][name] = {"throughput": round(
            r["output_tokens_per_s"] / base["throughput"]["output_tokens_per_s"], 3)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "latency_by_kind.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for p in plot(result, args.out_dir):
        print(f"wrote {p}")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
