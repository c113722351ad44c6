"""Two commits' engines on the same workload, alternated in one run: is a change a regression?

    .venv/bin/python -m bench.ab_commits BASE NEW [--rounds 4] [--dtype bfloat16] [--threads 2]
        [--weights bf16|int8|int4] [--context N] [--loras qv|heavy]

Each commit is checked out into a git worktree under --work (kept, reused); each round runs one
fresh process per commit, alternating, so a busy machine slows both alike. A process builds the
offline engine on SmolLM2 (the default model; --weights: its base weights' form), warms it on
4 requests, then times the 32-request workload given at once (bench.common.workload(): chat
prompts, 16..128 new tokens, greedy, EOS ignored; with --loras each on its own LoRA of
bench/multi_adapter.py's, written once by this tree) and one request of 128 tokens alone; with
--context N instead one request alone whose prompt is N tokens (a repeated sentence), the median
of its 64 decode steps (the prefill left out), for long-context decode; with --host-step
instead this tree's bench/host_step.py (the host time of a captured decode step at batch 8, 32
and 64: what the GPU waits for), run against each commit's engine. The
venv's editable install is pointed at the worktree by a sitecustomize on PYTHONPATH (the C++
kernels build per source, so each tree gets its own). Reports medians per commit and
NEW / BASE; writes --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.common import environment

ROOT = Path(__file__).resolve().parents[1]

# Runs in the worktree's process: `python -c RUN dtype threads weights`.
RUN = textwrap.dedent("""
    import json, sys, time
    import torch
    from bench.common import workload
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import Engine
    from peftserve.engine.request import Request
    from peftserve.engine.sampling_params import SamplingParams
    dtype, threads, weights, context = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    loras = sys.argv[5:]  # --loras: one adapter directory per request of the workload
    torch.set_num_threads(threads)
    extra = {} if weights == "bf16" else {"weights": weights}  # trees from before --weights
    if loras:
        extra.update(max_loras=len(loras), max_lora_rank=64, max_num_seqs=64)
    engine = Engine.from_config(EngineConfig(dtype=dtype, num_threads=threads, **extra))
    for i, path in enumerate(loras):
        engine.adapters.register(f"l{i}", path)
    adapter = (lambda i: f"l{i % len(loras)}") if loras else (lambda i: None)
    if context:
        ids = engine.tokenizer("The quick brown fox jumps over the lazy dog. " * (context // 8))
        engine.add_request(Request("long", prompt_token_ids=tuple(ids["input_ids"][:context]),
                                   params=SamplingParams(max_new_tokens=65, ignore_eos=True)))
        engine.step()  # the prefill (one chunk up to max_num_batched_tokens)
        while engine.scheduler.running[0].num_computed_tokens < context:
            engine.step()
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        steps.sort()
        print(json.dumps({"decode_step_ms": 1e3 * steps[len(steps) // 2]}))
        sys.exit()
    work = workload()
    def requests(tag, items):
        return [Request(f"{tag}{i}", messages=({"role": "user", "content": p},),
                        params=SamplingParams(max_new_tokens=n, ignore_eos=True),
                        adapter=adapter(i))
                for i, (p, n) in enumerate(items)]
    engine.generate(requests("warm", work[:4]))
    t = time.perf_counter()
    res = engine.generate(requests("batch", work))
    batch = sum(len(o.token_ids) for outs in res.values() for o in outs) / (time.perf_counter() - t)
    t = time.perf_counter()
    engine.generate(requests("one", [(work[0][0], 128)]))
    print(json.dumps({"batch32_tok_s": batch, "single_tok_s": 128 / (time.perf_counter() - t)}))
""")

# Imported by site before anything else: the editable install's paths moved to the worktree.
SITECUSTOMIZE = textwrap.dedent(f"""
    import os
    _tree = os.environ["PEFTSERVE_TREE"]
    import __editable___peftserve_0_1_0_finder as _finder
    _finder.MAPPING.update({{k: v.replace({str(ROOT)!r}, _tree)
                            for k, v in _finder.MAPPING.items()}})
    for _k, _v in _finder.NAMESPACES.items():
        _finder.NAMESPACES[_k] = [p.replace({str(ROOT)!r}, _tree) for p in _v]
""")


def worktree(work: Path, commit: str) -> Path:
    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", commit], text=True).strip()
    tree = work / sha[:12]
    if not tree.exists():
        subprocess.check_call(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach",
                               str(tree), sha])
    return tree


def write_loras(work: Path, kind: str) -> list[str]:
    """bench/multi_adapter.py's 32 LoRAs of `kind` (its lora-qv: q,v ranks 8/16; lora-heavy:
    every linear module, ranks 8-64), written once by this tree for both commits."""
    from transformers import AutoConfig

    from bench.common import workload
    from bench.multi_adapter import ALL, QV, write_lora
    from peftserve.models.llama import ModelShape
    from peftserve.models.loader import resolve_model_dir

    shape = ModelShape.from_config(AutoConfig.from_pretrained(resolve_model_dir("default")))
    root = work / f"loras-{kind}"
    paths = []
    for i in range(len(workload())):
        path = root / f"l{i}"
        if not (path / "adapter_config.json").exists():
            rank = (8, 16)[i % 2] if kind == "qv" else (8, 16, 32, 64)[i % 4]
            write_lora(path, shape, rank, QV if kind == "qv" else ALL,
                       seed=i if kind == "qv" else 100 + i)  # fmt: skip
        paths.append(str(path))
    return paths


def run_once(
    tree: Path, site: Path, dtype: str, threads: int, weights: str, context: int, host_step: bool,
    loras: list[str] = (),  # type: ignore[assignment]
) -> dict[str, float]:
    env = {**os.environ, "PEFTSERVE_TREE": str(tree), "PYTHONPATH": f"{site}{os.pathsep}{tree}"}
    if host_step:
        out_json = site / "host_step.json"
        cmd = [sys.executable, str(ROOT / "bench" / "host_step.py"), "--batches", "8", "32", "64",
               "--steps", "48", "--out", str(out_json)]  # fmt: skip
        subprocess.run(cmd, cwd=tree, env=env, capture_output=True, timeout=900, check=True)
        rows = json.loads(out_json.read_text())["rows"]
        return {f"host_ms_batch_{r['batch']}": r["host_ms_median"] for r in rows}
    out = subprocess.run([sys.executable, "-c", RUN, dtype, str(threads), weights, str(context),
                          *loras], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=900, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="bf16", choices=("bf16", "int8", "int4"))
    ap.add_argument("--context", type=int, default=0,
                    help="prompt tokens of one long-context request (0: the workload)")
    ap.add_argument("--host-step", action="store_true",
                    help="time bench/host_step.py instead of the workload")
    ap.add_argument("--loras", choices=("qv", "heavy"), default=None,
                    help="each request of the workload on its own LoRA (bench/multi_adapter.py's "
                         "lora-qv or lora-heavy; the one alone on the first)")  # fmt: skip
    ap.add_argument("--work", default="/tmp/peftserve-ab", help="worktrees live here")
    ap.add_argument("--out", default="bench/results/ab_commits.json")
    args = ap.parse_args()
    work = Path(args.work)
    site = work / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trees = {name: worktree(work, name) for name in (args.base, args.new)}
    loras = write_loras(work, args.loras) if args.loras else []
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(
                run_once(tree, site, args.dtype, args.threads, args.weights, args.context,
                         args.host_step, loras)
            )
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    medians = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()
    }
    ratios = {k: medians[args.new][k] / medians[args.base][k] for k in medians[args.new]}
    result = {
        "command": " ".join(["python -m bench.ab_commits", *sys.argv[1:]]),
        "environment": environment(),
        "load_average": os.getloadavg(),
        "base": args.base, "new": args.new, "dtype": args.dtype, "threads": args.threads,
        "weights": args.weights, "context": args.context, "host_step": args.host_step,
        "loras": args.loras,
        "runs": runs, "medians": medians, "new_over_base": ratios,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": medians, "new_over_base": ratios}, indent=2))


if __name__ == "__main__":
    main()
