"""Many adapters in one batch on SmolLM2: peftserve's configurations and PEFT's, same requests.

    .venv/bin/python -m bench.multi_adapter                  # bf16 (the serving default here)
    .venv/bin/python -m bench.multi_adapter --dtype float32

Workload: bench.common.workload() — 32 chat requests given at once, outputs 16..128 tokens
(seed 0), greedy, EOS ignored. Configurations, each on exactly these requests:

  base            no adapter
  lora-qv         32 distinct LoRA adapters on q,v, ranks 8/16 alternating
  lora-heavy      32 distinct LoRA adapters on all linear layers, ranks 8/16/32/64
  mixed-kinds     LoRA, Houlsby, Pfeiffer, prefix tuning, prompt tuning and a template, cycled
  peft-mixed      PEFT generate(adapter_names=...) with the lora-qv adapters, all 32 at once
  peft-swap       PEFT set_adapter per request (batch 1), the lora-qv adapters

Each peftserve configuration is timed in --rounds interleaved rounds (median reported, and
vs_base as the median of the per-round ratios); it also reports its decode step against its
own floor: one pass of plain matmuls over the base weights plus the weights of the distinct
adapters active in the step (concatenated, so that their bytes are timed, not the overhead of
thousands of tiny calls), timed in the same run; in CPU half precision also the same pass with
the base weights packed as the engine holds them (the stricter floor). Cold start: register a
rank-16 all-linear adapter from disk, then time to its first token, split into the registration
and the first request, next to the base model's first token on the same prompt (the prefill
alone).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import decode_step_vs_floor, environment, matmul_floors, workload
from peftserve.adapters.lora import module_dims, module_name
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.models.llama import ModelShape
from peftserve.models.loader import resolve_model_dir
from tests import adapters as A

QV = ["q", "v"]
ALL = ["q", "k", "v", "o", "gate", "up", "down"]


def write_lora(
    out: Path, shape: ModelShape, rank: int, targets: list[str], seed: int,
    device: str = "cpu", dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """A PEFT-format LoRA with random (non-zero) weights, written directly: fast for many.
    `device`: where they are drawn (on one CPU core an 8B shape's rank-64 all-linear adapter,
    168M weights, takes ~2 s to draw and write in fp32); `dtype`: as saved. The defaults give
    the same weights as before these two existed."""
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for p in targets:
            d_in, d_out = module_dims(shape, p)
            key = f"base_model.model.{module_name(layer, p)}"
            a = torch.randn(rank, d_in, generator=g, device=device) / d_in**0.5
            b = torch.randn(d_out, rank, generator=g, device=device) * 0.01
            tensors[f"{key}.lora_A.weight"] = a.to("cpu", dtype)
            tensors[f"{key}.lora_B.weight"] = b.to("cpu", dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": [f"{p}_proj" for p in targets],
                "bias": "none",
                "lora_dropout": 0.0,
            }
        )
    )
    return out


def chat_ids(tok, message: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": message}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]


def make_requests(work, prompts, lengths, adapters) -> list[Request]:
    """Token ids, except for templates, which render their own turns around the message."""
    reqs = []
    for i, (p, n, a) in enumerate(zip(prompts, lengths, adapters, strict=True)):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        if a is not None and "template" in a:
            msgs = ({"role": "user", "content": work[i][0]},)
            reqs.append(Request(f"r{i}", messages=msgs, adapter=a, params=params))
        else:
            reqs.append(Request(f"r{i}", prompt_token_ids=tuple(p), adapter=a, params=params))
    return reqs


def floor_pass(
    engine: Engine, adapters: list[str | None], batch: int
) -> dict[str, Callable[[], None]]:
    """Matmuls over the base weights and every distinct active adapter's weights
    (bench.common.matmul_floors: "plain", and "packed" where the base weights are packed)."""
    m = engine.model
    mats = []
    for name in sorted({a for a in adapters if a}):
        loaded = engine.registry.load_from_disk(engine.registry.get(name).source)
        if loaded.lora is not None:
            mats += [(mod.A.to(m.dtype), mod.B.to(m.dtype)) for mod in loaded.lora.modules.values()]
        elif loaded.bottleneck is not None:
            mats += [
                (wd.to(m.dtype), wu.to(m.dtype))
                for wd, _, wu, _ in loaded.bottleneck.modules.values()
            ]
    # The adapters' weights, each read once as if by one token: A's concatenated by input
    # width and B's by output width, so the pass reads their bytes in a few matmuls (one
    # F.linear per adapter module would time ~3,800 calls' overhead, not the bytes).
    a_by_in: dict[int, list[torch.Tensor]] = {}
    b_by_out: dict[int, list[torch.Tensor]] = {}
    for a, b in mats:
        a_by_in.setdefault(a.shape[1], []).append(a)
        b_by_out.setdefault(b.shape[0], []).append(b)
    shrink = [(torch.randn(1, k, dtype=m.dtype), torch.cat(w)) for k, w in a_by_in.items()]
    expand = [(torch.randn(1, sum(t.shape[1] for t in w), dtype=m.dtype), torch.cat(w, dim=1))
              for w in b_by_out.values()]  # fmt: skip

    def adapters_once() -> None:
        for xin, w in shrink + expand:
            F.linear(xin, w)

    return matmul_floors(m, batch, adapters_once)


def decode_vs_floor(engine: Engine, reqs: list[Request]) -> dict:
    """A step once all 32 requests are decoding and the configuration's floor passes, timed
    in turn 9 times (median times, median of the paired ratios)."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    probe = [replace(r, request_id=f"p-{r.request_id}", params=params) for r in reqs]
    floors = floor_pass(engine, [r.adapter for r in reqs], len(reqs))
    return decode_step_vs_floor(engine, probe, 9, floors)


def warm(engine: Engine, reqs: list[Request]) -> None:
    """One token for each request: every adapter of the configuration is resident in a slot
    (and its prefix KV written) before the timed run, which measures serving, not loading
    (cold_start measures that). Without it a run pays for reloading what the previous
    configuration evicted, which depends on the order of the runs."""
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engine.generate([replace(r, request_id=f"warm-{r.request_id}", params=one) for r in reqs])


def run_ours(engine: Engine, reqs: list[Request], tokens: int) -> dict:
    warm(engine, reqs)
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    elapsed = time.perf_counter() - t0
    assert sum(o[-1].completion_tokens for o in results.values()) == tokens
    r = decode_vs_floor(engine, reqs)
    return {
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        "decode_step_ms": r["step"] * 1e3,
        "floor_ms": r["floor"]["plain"] * 1e3,
        "step_over_floor": r["ratio"]["plain"],  # median of the paired ratios
        **(
            {
                "packed_floor_ms": r["floor"]["packed"] * 1e3,
                "step_over_packed_floor": r["ratio"]["packed"],
            }
            if "packed" in r["floor"]
            else {}
        ),
    }


def run_peft_mixed(model, tok, prompts, lengths, names) -> float:
    pad = tok.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=max(lengths),
            min_new_tokens=max(lengths),
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
        )
    return time.perf_counter() - t0


def run_peft_swap(model, prompts, lengths, names) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, n, name in zip(prompts, lengths, names, strict=True):
            model.set_adapter(name)
            model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
            )
    return time.perf_counter() - t0


def first_token(engine: Engine, prompt: list[int], adapter: str | None, rid: str) -> float:
    t0 = time.perf_counter()
    engine.generate(
        [
            Request(
                rid,
                prompt_token_ids=tuple(prompt),
                adapter=adapter,
                params=SamplingParams(max_new_tokens=1, ignore_eos=True),
            )
        ]
    )
    return time.perf_counter() - t0


def cold_start(engine: Engine, root: Path, prompt: list[int], reps: int = 7) -> dict:
    """Register a rank-16 all-linear adapter from disk, then time to its first token; split
    into the registration (read, validate) and the first request (slot write + prefill), next
    to the base model's first token on the same prompt and to the adapter's next first token
    (resident in its slot: the prefill alone), so that the first request less that is the
    slot write and what else a new adapter costs; and the slot write alone (DeviceSlots.
    write_lora, on a GPU to its copies' end: a sync the first request otherwise lacks), and the
    CUDA graph captures inside each first request (its adapters' modules in a bucket not yet
    captured: the first repetition's, if any)."""
    total, register, first, resident, base, writes = [], [], [], [], [], []
    captured = []  # CUDA graph capture inside each first request, s (a new bucket or module set)
    static = engine.runner.static
    graphs = static.graphs if static is not None else None

    def capture_s() -> float:  # the engine's CUDA graph capture so far, s
        return graphs.capture_seconds if graphs is not None else 0.0

    slots = engine.adapters.slots
    write = slots.write_lora

    def timed_write(slot, weights) -> None:
        t0 = time.perf_counter()
        write(slot, weights)
        if slots.device.type == "cuda":
            torch.cuda.synchronize(slots.device)
        writes.append(time.perf_counter() - t0)

    slots.write_lora = timed_write
    try:
        for i in range(reps):
            path = write_lora(root / f"cold{i}", engine.model.shape, 16, ALL, seed=1000 + i)
            base.append(first_token(engine, prompt, None, f"b{i}"))
            t0 = time.perf_counter()
            engine.adapters.register(f"cold{i}", path)
            register.append(time.perf_counter() - t0)
            before = capture_s()
            first.append(first_token(engine, prompt, f"cold{i}", f"c{i}"))
            captured.append(capture_s() - before)
            total.append(register[-1] + first[-1])
            resident.append(first_token(engine, prompt, f"cold{i}", f"again{i}"))
            engine.adapters.unregister(f"cold{i}")
    finally:
        del slots.write_lora  # the class's own again
    return {
        "p50": statistics.median(total) * 1e3,
        "max": max(total) * 1e3,
        "all": [t * 1e3 for t in total],
        "register_p50": statistics.median(register) * 1e3,
        "first_request_p50": statistics.median(first) * 1e3,
        "slot_write_p50": statistics.median(writes) * 1e3,
        "graph_capture_ms": [t * 1e3 for t in captured],
        "resident_first_token_p50": statistics.median(resident) * 1e3,
        "base_first_token_p50": statistics.median(base) * 1e3,
        "prompt_tokens": len(prompt),
    }


def _where(key: tuple[str, int, str]) -> str:
    """cProfile's (file, line, function) as package/module.py:line function, the path from
    the repository root, site-packages or the standard library."""
    path, line, fn = key
    repo = f"{Path(__file__).resolve().parents[1]}/"
    for marker in ("/peftserve/", "/site-packages/", repo, "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line} {fn}" if line else fn


def cold_profile(engine: Engine, root: Path, prompt: list[int], top: int = 25) -> dict:
    """One more cold start (cold_start's adapter) under cProfile: where its host time goes, the
    functions by time inside them (cumulative) and by their own time, each with its calls. The
    profiler's own cost inflates the total; the shares are what it is for."""
    path = write_lora(root / "cold_profile", engine.model.shape, 16, ALL, seed=999)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    engine.adapters.register("cold_profile", path)
    first_token(engine, prompt, "cold_profile", "cold-profile")
    prof.disable()
    total = time.perf_counter() - t0
    engine.adapters.unregister("cold_profile")
    rows = [(_where(key), calls, own, cum)
            for key, (_, calls, own, cum, _) in pstats.Stats(prof).stats.items()]  # fmt: skip

    def ranked(index: int) -> list[dict]:
        best = sorted(rows, key=lambda r: -r[index])[:top]
        return [{"function": f, "calls": n, "own_ms": own * 1e3, "cumulative_ms": cum * 1e3}
                for f, n, own, cum in best]  # fmt: skip

    return {"total_ms": total * 1e3, "by_cumulative": ranked(3), "by_own": ranked(2)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-peft-swap", action="store_true", help="the slowest baseline")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_path = Path(args.out or f"bench/results/multi_adapter_{args.dtype}.json")
    model_dir = resolve_model_dir("default")
    tok = AutoTokenizer.from_pretrained(model_dir)
    work = workload()
    prompts = [chat_ids(tok, m) for m, _ in work]
    lengths = [n for _, n in work]
    tokens = sum(lengths)
    n = len(work)
    engine = Engine.from_config(
        EngineConfig(
            model="default", dtype=args.dtype, max_num_seqs=64, max_loras=n, max_lora_rank=64
        )
    )
    root = Path(tempfile.mkdtemp(prefix="peftserve-bench-"))
    qv = [
        write_lora(root / f"qv{i}", engine.model.shape, (8, 16)[i % 2], QV, seed=i)
        for i in range(n)
    ]
    heavy = [
        write_lora(
            root / f"heavy{i}", engine.model.shape, (8, 16, 32, 64)[i % 4], ALL, seed=100 + i
        )
        for i in range(n)
    ]
    kinds = {
        "mix-lora": write_lora(root / "mix-lora", engine.model.shape, 16, QV, seed=200),
        "mix-houlsby": A.make_bottleneck(model_dir, root / "houlsby", "houlsby", seed=201),
        "mix-pfeiffer": A.make_bottleneck(model_dir, root / "pfeiffer", "pfeiffer", seed=202),
        "mix-prefix": A.make_prefix_tuning(model_dir, root / "prefix", virtual=16, seed=203),
        "mix-prompt": A.make_prompt_tuning(model_dir, root / "prompt", virtual=8, seed=204),
        "mix-template": A.make_template(
            root / "template",
            system="You are a helpful assistant.",
            few_shot=[{"user": "Say hi.", "assistant": "Hi!"}],
        ),
    }
    for i, p in enumerate(qv):
        engine.adapters.register(f"qv{i}", p)
    for i, p in enumerate(heavy):
        engine.adapters.register(f"heavy{i}", p)
    for name, p in kinds.items():
        engine.adapters.register(name, p)
    configs = {
        "base": [None] * n,
        "lora-qv": [f"qv{i}" for i in range(n)],
        "lora-heavy": [f"heavy{i}" for i in range(n)],
        "mixed-kinds": [list(kinds)[i % len(kinds)] for i in range(n)],
    }
    results: dict = {
        "environment": environment(),
        "dtype": args.dtype,
        "requests": n,
        "output_tokens": tokens,
        "configs": {},
    }
    rounds: dict[str, list[float]] = {}
    for name, adapters in configs.items():
        r = run_ours(engine, make_requests(work, prompts, lengths, adapters), tokens)
        results["configs"][name] = r
        rounds[name] = [r["tok_s"]]
        print(name, json.dumps(r))
    # More rounds of the timed run, the configurations interleaved, so that drift of this shared
    # machine hits them alike; tok_s is the median of the rounds, vs_base the median of each
    # round's ratio to that round's base run.
    for _ in range(args.rounds - 1):
        for name, adapters in configs.items():
            reqs = make_requests(work, prompts, lengths, adapters)
            warm(engine, reqs)
            t0 = time.perf_counter()
            engine.generate(reqs)
            rounds[name].append(tokens / (time.perf_counter() - t0))
        print("round", {k: round(v[-1], 1) for k, v in rounds.items()}, flush=True)
    for name, r in results["configs"].items():
        r["rounds_tok_s"] = rounds[name]
        r["tok_s"] = statistics.median(rounds[name])
        r["vs_base"] = statistics.median(
            t / b for t, b in zip(rounds[name], rounds["base"], strict=True)
        )
    results["cold_register_to_first_token_ms"] = cold_start(engine, root, prompts[0])
    print("cold", results["cold_register_to_first_token_ms"])
    del engine
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), qv[0], adapter_name="qv0"
    ).eval()
    for i in range(1, n):
        peft.load_adapter(qv[i], adapter_name=f"qv{i}")
    t = run_peft_mixed(peft, tok, prompts, lengths, configs["lora-qv"])
    results["configs"]["peft-mixed"] = {"seconds": t, "tok_s": tokens / t}
    print("peft-mixed", t)
    if not args.skip_peft_swap:
        t = run_peft_swap(peft, prompts, lengths, configs["lora-qv"])
        results["configs"]["peft-swap"] = {"seconds": t, "tok_s": tokens / t}
        print("peft-swap", t)
    ours = results["configs"]["lora-qv"]["tok_s"]
    results["lora_qv_vs_peft_mixed"] = ours / results["configs"]["peft-mixed"]["tok_s"]
    if "peft-swap" in results["configs"]:
        results["lora_qv_vs_peft_swap"] = ours / results["configs"]["peft-swap"]["tok_s"]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
