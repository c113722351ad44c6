"""The engine on a CUDA GPU at SmolLM2-135M's shape, against transformers and PEFT in the same run.

    python -m bench.gpu_engine --model-dir DIR [--shape smollm2|llama-3.1-8b] [--out PATH]

DIR holds SmolLM2-135M-Instruct's config and tokenizer. With --shape, a model of that shape with
seeded random bf16 weights generated on the GPU is written under /dev/shm (bench.random_weights,
SmolLM2's tokenizer) and served; without it, random weights are written into DIR when it has
none: the real weights cannot travel to the GPU machine, and with EOS ignored every
configuration produces exactly the planned tokens, so throughput does not depend on the
weights' values. Everything bf16 on one GPU, greedy, TF32 irrelevant (bf16). The engine runs
the static decode step with CUDA graphs (its default on CUDA); capture time is reported.
`--device cpu` runs the same code on the CPU without graphs, a dry run of the script
(tests/unit/test_gpu_engine_bench.py: every section at the "tiny" shape).

Sections, each on the same 32 requests as bench.engine_throughput / bench.multi_adapter
(bench.common.workload(): chat prompts, outputs 16..128 tokens, seed 0):
  throughput   ours vs transformers `generate` (one left-padded batch of 32; batches of 8)
  decode step  ours at batch 1/8/32/64 vs one plain matmul pass over the same weights (the
               floor), with the CUDA graphs; with them but each step scheduled once the last
               one's tokens are back (EngineConfig.schedule_ahead off); with neither that nor
               the outputs made while the next step runs (overlap_outputs off); and the same
               static step run eagerly. A step's time is the mean over a run of STEADY_STEPS
               steps with no synchronization between them (bench.common.steady_step_time)
  adapters     base; 32 distinct LoRAs on q,v (ranks 8/16); 32 distinct all-linear LoRAs (ranks
               8/16/32/64), through the Triton kernels; PEFT generate(adapter_names=...) with
               the q,v adapters
  cold         (only when named) register a rank-16 all-linear adapter from disk -> its first
               token, next to the base model's first token (bench.multi_adapter.cold_start);
               then one more under cProfile: where its host time goes (cold_profile)
  profile      (only when named; last) where a decode step's device time goes: 8 steps under
               torch.profiler, the device time of each kernel a step (a CUDA graph's kernels
               are recorded one by one), their number, and the device's busy time a step: the
               base model at batch 1 and 32, and with the adapters section each of its
               configurations at batch 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bench.common import (
    environment,
    start_decoding,
    steady_step_time,
    step_phases,
    timed,
    workload,
)
from bench.decode_kernels import set_tiles
from bench.engine_throughput import matmul_pass
from bench.multi_adapter import (
    ALL,
    QV,
    chat_ids,
    cold_profile,
    cold_start,
    first_token,
    make_requests,
    write_lora,
)
from bench.random_weights import SHAPES, write_model
from peftserve.config import LORA_OVERLAP, EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams

DEV = "cuda"  # --device cpu runs the same code on a CPU (a dry run of the script)
REPEAT = 3  # --repeat: timed runs of the engine per configuration (best of them)
STEADY_STEPS = 24  # decode steps a step time is the mean of (max_new_tokens 60 leaves room)


def sync() -> None:
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def ensure_weights(model_dir: Path) -> str:
    if any(model_dir.glob("*.safetensors")):
        return "from the directory"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    return "random (seed 0): real weights cannot travel to this machine"


def cuda_time(fn: Callable[[], object], repeat: int = 1) -> float:
    return timed(fn, repeat, sync)


def run_engine(engine: Engine, reqs: list[Request], tokens: int) -> None:
    results = engine.generate(reqs)
    got = sum(outs[-1].completion_tokens for outs in results.values())
    assert got == tokens, (got, tokens)


def hf_generate(model, pad: int, prompts, lengths, batch: int, **kw) -> None:
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=DEV)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=DEV)
        n = max(lengths[i : i + batch])
        names = kw.get("adapter_names")
        extra = {"adapter_names": names[i : i + batch]} if names else {}
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
                **extra,
            )


def decode_step(engine: Engine, reqs: list[Request], batch: int) -> float:
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    probe = [
        replace(reqs[i % len(reqs)], request_id=f"d{batch}-{i}", params=params)
        for i in range(batch)
    ]
    return steady_step_time(engine, probe, STEADY_STEPS)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--sections", default="throughput,floor,adapters,peft", help="and/or cold (start)"
    )
    ap.add_argument("--configs", default="base,lora-qv,lora-heavy", help="adapters section")
    ap.add_argument("--out", default="bench/results/gpu_engine.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="serve random weights of this shape (written under /dev/shm)")
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="where --shape's weights go (default /dev/shm/peftserve-SHAPE)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed engine runs per configuration (generate: one fewer)")
    ap.add_argument("--lora-overlap", choices=LORA_OVERLAP, default="off",
                    help="EngineConfig.lora_overlap: each LoRA's shrink (or whole delta) on a "
                         "second stream beside its base matmul")
    ap.add_argument("--lora-tiles", default=None, metavar="N:W:K:W[:RC[:P]]",
                    help="the one-launch LoRA kernels' tiles (bench.decode_kernels.set_tiles) "
                         "for the whole run, e.g. the fastest of gpu.sh's lora_tiles step")
    args = ap.parse_args()
    global DEV, REPEAT
    DEV, REPEAT = args.device, args.repeat
    model_dir = Path(args.model_dir)
    if args.shape:
        shm = args.weights_dir or Path("/dev/shm") / f"peftserve-{args.shape}"
        weights = write_model(args.shape, model_dir, shm, device=DEV)
        model_dir = Path(weights["dir"])
        print("weights", json.dumps(weights), flush=True)
    else:
        weights = ensure_weights(model_dir)
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    work = workload()
    prompts = [chat_ids(tok, m) for m, _ in work]
    lengths = [n for _, n in work]
    tokens = sum(lengths)
    gpu = torch.cuda.get_device_name() if DEV.startswith("cuda") else None
    default_tiles = set_tiles(args.lora_tiles) if args.lora_tiles else None
    out: dict = {
        "environment": {**environment(), "gpu": gpu},
        "shape": args.shape or "smollm2",
        "lora_tiles": args.lora_tiles or "default",
        "lora_overlap": args.lora_overlap,
        "default_lora_tiles": default_tiles,
        "weights": weights,
        "dtype": args.dtype,
        "requests": len(work),
        "output_tokens": tokens,
    }

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    def section(name: str, body: Callable[[], None]) -> None:
        """Runs a section; one that raises is recorded under "errors" (its traceback in the
        log) and the next runs on an engine cleared of its requests: one GPU run measures
        what it can."""
        try:
            body()
        except Exception as e:
            traceback.print_exc()
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
                engine.abort(seq.request_id)
        save()

    t0 = time.perf_counter()
    engine = Engine.from_config(
        EngineConfig(
            model=str(model_dir),
            dtype=args.dtype,
            device=DEV,
            max_num_seqs=64,
            max_loras=64,
            max_lora_rank=64,
            kv_cache_bytes=4 << 30,
            max_model_len=args.max_model_len,
            lora_overlap=args.lora_overlap,
        )
    )
    graphs = engine.runner.static.graphs if engine.runner.static is not None else None
    table = getattr(engine.model.backend, "lora_tiles", None)  # the Triton backend's
    out["lora_tile_table"] = table.source if table is not None else None
    out["engine_start_s"] = time.perf_counter() - t0  # load + CUDA graph capture
    out["cuda_graph_capture_s"] = graphs.capture_seconds if graphs is not None else None
    out["cuda_graph_batch_sizes"] = list(graphs.sizes) if graphs is not None else []
    print("engine start", out["engine_start_s"], "graph capture", out["cuda_graph_capture_s"],
          flush=True)  # fmt: skip
    base = make_requests(work, prompts, lengths, [None] * len(work))
    sections = set(args.sections.split(","))
    out["sections"] = sorted(sections)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEV).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    run_engine(engine, base[:4], sum(lengths[:4]))  # warm-up

    # --- throughput vs transformers ------------------------------------------------------------
    if "throughput" in sections:
        section("throughput", lambda: throughput(engine, hf, pad, base, prompts, lengths, out))

    # --- decode step vs the matmul floor -------------------------------------------------------
    def floor() -> None:
        out["decode_floor"] = decode_floor(engine, base)

    if "floor" in sections:
        section("floor", floor)

    # --- many adapters in one batch ------------------------------------------------------------
    adapters_dir = tempfile.TemporaryDirectory()  # kept for the profile section
    adapter_names: dict[str, list] = {}
    if "adapters" in sections or "peft" in sections:
        configs = ["base", *[c for c in args.configs.split(",") if c != "base"]]
        if "peft" in sections and "lora-qv" not in configs:
            configs.append("lora-qv")
        section("adapters", lambda: adapter_names.update(many_adapters(
            engine, hf, pad, work, prompts, lengths, configs, "peft" in sections, out,
            Path(adapters_dir.name))))  # fmt: skip

    # --- cold register -> first token ----------------------------------------------------------
    def cold() -> None:
        with tempfile.TemporaryDirectory() as root:
            first_token(engine, prompts[0], None, "cold-warm-up")
            out["cold_register_to_first_token_ms"] = cold_start(engine, Path(root), prompts[0])
            print("cold", json.dumps(out["cold_register_to_first_token_ms"]), flush=True)
            out["cold_profile"] = cold_profile(engine, Path(root), prompts[0])

    if "cold" in sections:
        section("cold", cold)

    # --- where the device time of a decode step goes (last: the profiler's risks its own) -------
    def profiles() -> None:
        out["profile"] = {str(b): profile_decode(engine, base, b) for b in (1, 32)}
        save()
        for name in adapter_names:
            reqs = make_requests(work, prompts, lengths, adapter_names[name])
            out["adapters"][name]["profile"] = profile_decode(engine, reqs, 32)
            save()

    if "profile" in sections:
        section("profile", profiles)
    adapters_dir.cleanup()
    print(f"wrote {args.out}")
    if out.get("errors"):
        print("sections that failed:", json.dumps(out["errors"], indent=1), flush=True)
        raise SystemExit(1)


def throughput(engine, hf, pad, base, prompts, lengths, out) -> None:
    tokens = sum(lengths)
    t_ours = cuda_time(lambda: run_engine(engine, base, tokens), repeat=REPEAT)
    hf_generate(hf, pad, prompts[:4], [4] * 4, 4)  # warm-up
    t_hf32 = cuda_time(lambda: hf_generate(hf, pad, prompts, lengths, 32),
                       repeat=max(1, REPEAT - 1))  # fmt: skip
    t_hf8 = cuda_time(lambda: hf_generate(hf, pad, prompts, lengths, 8), repeat=1)
    out["throughput"] = {
        "engine_tok_s": tokens / t_ours,
        "hf_generate_batch32_tok_s": tokens / t_hf32,
        "hf_generate_batch8_tok_s": tokens / t_hf8,
        "speedup_vs_hf_batch32": t_hf32 / t_ours,
        "speedup_vs_hf_batch8": t_hf8 / t_ours,
    }
    print(json.dumps(out["throughput"], indent=1), flush=True)


def decode_floor(engine, base) -> dict:
    floor = {}
    static = engine.runner.static
    graphs = static.graphs if static is not None else None
    for b in (1, 8, 32, 64):
        step, mm = decode_step(engine, base, b), matmul_pass(engine, b, sync)
        floor[str(b)] = {
            "decode_step_ms": step * 1e3,
            "matmul_pass_ms": mm * 1e3,
            "step_over_floor": step / mm,
            "cuda_graphs": graphs is not None,
        }
        if graphs is not None:  # the same static step, its graphs set aside: run eagerly
            static.graphs = None
            try:
                eager = decode_step(engine, base, b)
            finally:
                static.graphs = graphs
            floor[str(b)] |= {"eager_decode_step_ms": eager * 1e3,
                              "eager_step_over_floor": eager / mm}  # fmt: skip
            # with graphs, each step scheduled after the last one's tokens; and each step's
            # outputs made in that step too, not during the next one's
            config = engine.config
            for key, off in (("no_ahead", {"schedule_ahead": False}),
                             ("no_overlap", {"schedule_ahead": False, "overlap_outputs": False})):
                engine.config = replace(config, **off)
                try:
                    floor[str(b)][f"{key}_decode_step_ms"] = decode_step(engine, base, b) * 1e3
                finally:
                    engine.config = config
    print(json.dumps(floor, indent=1), flush=True)
    return floor


def profile_decode(engine: Engine, reqs: list[Request], batch: int, steps: int = 8) -> dict:
    """`steps` decode steps of `batch` requests under torch.profiler (after three unprofiled
    ones: the bucket's graphs are captured by then). Per step: each kernel's device time and
    launches, every kernel's, and the device's busy time (the union of the kernels'
    intervals; the rest of a step is the host's part and the gaps between launches). The
    step's two copies (the upload, the sampled ids back) are device activities too and count
    among the kernels, under their memcpy names, and so do a step scheduled ahead's three
    small kernels outside its graph (the sampled ids kept, gathered into its input ids). The
    profiler slows the host, so the profiled wall time is not the step's. On the CPU (a dry
    run) the top-level CPU ops stand in for kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
    probe = [replace(reqs[i % len(reqs)], request_id=f"p{batch}-{i}", params=params)
             for i in range(batch)]  # fmt: skip
    start_decoding(engine, probe)
    for _ in range(3):
        engine.step()
    cuda = DEV.startswith("cuda")
    activities = [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]  # kernels only
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    kernels = [e for e in prof.events()
               if e.device_type == kind and (cuda or e.cpu_parent is None)]  # fmt: skip
    by_name: dict[str, list[float]] = {}
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    for e in kernels:
        by_name.setdefault(e.name[:120], []).append(e.time_range.end - e.time_range.start)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of the intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    total = sum(b - a for a, b in spans)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    result = {
        "batch": batch,
        "steps": steps,
        "profiled_step_ms": wall * 1e3 / steps,
        "device_busy_us_per_step": busy / steps,
        "kernel_us_per_step": total / steps,
        "kernels_per_step": len(kernels) / steps,
        "top": [{"kernel": name, "us_per_step": sum(t) / steps,
                 "launches_per_step": len(t) / steps, "share": sum(t) / total if total else 0.0}
                for name, t in top],  # fmt: skip
    }
    print(f"profile batch {batch}: {result['kernels_per_step']:.0f} kernels, "
          f"{result['device_busy_us_per_step']:.0f} us busy a step", flush=True)
    return result


def many_adapters(
    engine, hf, pad, work, prompts, lengths, wanted, with_peft, out, root: Path
) -> dict[str, list[str | None]]:  # fmt: skip
    """The adapters section, its adapters written under `root`; -> each configuration's
    adapter per request."""
    tokens = sum(lengths)
    shape = engine.model.shape
    configs: dict[str, list[str | None]] = {"base": [None] * len(work)}
    qv = []
    # drawn on the device, saved in bf16: at the 8B shape the 32 all-linear adapters are
    # 2.5G weights, ~30 s to draw on one CPU core
    draw = {"device": DEV, "dtype": torch.bfloat16}
    t0 = time.perf_counter()
    for i in range(len(work)):
        qv.append(write_lora(root / f"qv{i}", shape, (8, 16)[i % 2], QV, seed=i, **draw))
        engine.adapters.register(f"qv{i}", qv[-1])
        if "lora-heavy" in wanted:
            rank = (8, 16, 32, 64)[i % 4]
            path = write_lora(root / f"all{i}", shape, rank, ALL, seed=100 + i, **draw)
            engine.adapters.register(f"all{i}", path)
    out["adapters_written_and_registered_s"] = time.perf_counter() - t0
    print(f"adapters written and registered in {out['adapters_written_and_registered_s']:.1f}"
          " s", flush=True)  # fmt: skip
    configs["lora-qv"] = [f"qv{i}" for i in range(len(work))]
    configs["lora-heavy"] = [f"all{i}" for i in range(len(work))]
    adapters = {}
    for name in wanted:
        names = configs[name]
        reqs = make_requests(work, prompts, lengths, names)
        run_engine(engine, reqs[:4], sum(lengths[:4]))  # warm-up: loads, kernel compiles
        t = cuda_time(lambda reqs=reqs: run_engine(engine, reqs, tokens), repeat=REPEAT)
        adapters[name] = {
            "tok_s": tokens / t,
            "decode_step_ms": decode_step(engine, reqs, 32) * 1e3,
            # one more run, its steps timed by phase: where a configuration's tok/s goes
            "phases": step_phases(engine, lambda reqs=reqs: run_engine(engine, reqs, tokens)),
        }
    for name in adapters:
        adapters[name]["vs_base"] = adapters[name]["tok_s"] / adapters["base"]["tok_s"]
    out["adapters"] = adapters
    print(json.dumps(adapters, indent=1), flush=True)
    if not with_peft:
        return configs
    t0 = time.perf_counter()
    peft = PeftModel.from_pretrained(hf, str(qv[0]), adapter_name="qv0")
    for i in range(1, len(work)):
        peft.load_adapter(str(qv[i]), adapter_name=f"qv{i}")
    peft = peft.to(DEV).eval()
    names = configs["lora-qv"]
    print(f"PEFT: 32 adapters loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    hf_generate(peft, pad, prompts[:4], [4] * 4, 4, adapter_names=names[:4])
    t_peft = cuda_time(
        lambda: hf_generate(peft, pad, prompts, lengths, 32, adapter_names=names), repeat=1
    )
    out["peft_mixed_tok_s"] = tokens / t_peft
    out["lora_qv_vs_peft_mixed"] = adapters["lora-qv"]["tok_s"] / (tokens / t_peft)
    print("peft mixed", out["peft_mixed_tok_s"], "ours/peft", out["lora_qv_vs_peft_mixed"])
    return configs


if __name__ == "__main__":
    main()
