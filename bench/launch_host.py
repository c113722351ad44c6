"""Host time of an eager step's adapter deltas through the Triton kernels, without a GPU: what
the thread that launches them spends per call, before the device does anything.

    .venv/bin/python -m bench.launch_host [--rounds 25] [--repeat 8] [--out PATH]
        # -> bench/results/launch_host_cpu.json

The engine runs a 37-token prefill with a rank-16 all-linear LoRA at SmolLM2's widths (30
layers, random weights, bf16) on the Triton backend under the compile-only Triton driver of
tests/kernels/gpu_compile.py (kernels compiled for sm_90, launches that do nothing), and
records the arguments of every `backend.lowrank_delta` call of that prefill (four adapted
projections a layer: 120). Those calls are then replayed back to back, with nothing between
them (as on a GPU host, whose thread only launches), for each form, the forms alternating
each round; the medians of the rounds, in microseconds per call. On the 2-core machine the
level moves by up to 2x from one process to the next (75-145 us a call for the same code);
the forms' ratio and difference within one process are what to read. Forms:
  now                the launchers as they are
  checks_every_call  every argument checked at every call (checks.check_lowrank_args), as
                     before the backend kept the weights it had accepted (LowrankChecks)
  triton_constexpr   that, and the launchers' host arithmetic through triton.cdiv and
                     triton.next_power_of_2 (constexpr functions, ~2.7 us a call from Python),
                     as before 13b6faf
Launches per call are counted at the driver. A GPU adds the driver's own launch cost
(cuLaunchKernel) to each launch; that is not here.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled, not interpreted

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.common import alternate, environment  # noqa: E402
from bench.random_weights import SHAPES  # noqa: E402
from peftserve.config import EngineConfig  # noqa: E402
from peftserve.engine.engine import Engine  # noqa: E402
from peftserve.engine.request import Request  # noqa: E402
from peftserve.engine.sampling_params import SamplingParams  # noqa: E402
from peftserve.kernels import (  # noqa: E402
    checks,
    triton_expand,
    triton_fused,
    triton_lowrank_rows,
    triton_paged_attention,
    triton_shrink,
)
from peftserve.layers.triton_backend import TritonBackend  # noqa: E402
from tests import adapters as A  # noqa: E402
from tests.kernels.gpu_compile import CompileOnly  # noqa: E402
from tests.tiny import make_model_dir  # noqa: E402

PROMPT = tuple(range(100, 137))  # 37 tokens, as bench.multi_adapter's cold start
LAUNCHERS = (triton_expand, triton_fused, triton_lowrank_rows, triton_paged_attention,
             triton_shrink)  # fmt: skip


def host_arithmetic(cdiv, pow2) -> None:
    """Points every launcher module's `cdiv` / `pow2_at_least` at these."""
    for module in LAUNCHERS:
        if hasattr(module, "cdiv"):
            module.cdiv = cdiv
        if hasattr(module, "pow2_at_least"):
            module.pow2_at_least = pow2


class Counting(CompileOnly):
    """The compile-only driver, counting launches."""

    launches = 0

    def launcher_cls(self, src, metadata):
        super().launcher_cls(src, metadata)

        def launch(*args, **kwargs):
            Counting.launches += 1

        return launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=8, help="replays of the calls per round")
    ap.add_argument("--out", default="bench/results/launch_host_cpu.json")
    args = ap.parse_args()
    driver.set_active(Counting(GPUTarget("cuda", 90, 32)))
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="peftserve-launch-"))
    widths = {k: v for k, v in SHAPES["smollm2"].items() if k != "tie_word_embeddings"}
    widths.update(vocab_size=2048, max_position_embeddings=2048)  # the head is not measured
    model_dir = make_model_dir(work / "model", **widths)
    lora = A.make_lora(model_dir, work / "lora", r=16, seed=1, targets=A.ALL_LINEAR)
    backend = TritonBackend()
    backend.captures_graphs = False
    engine = Engine.from_config(
        EngineConfig(model=str(model_dir), dtype="bfloat16", device="cpu", num_kv_blocks=64,
                     max_loras=4, decode_step="static", cuda_graphs=False), backend)  # fmt: skip
    engine.adapters.register("a", lora)
    calls: list[tuple] = []
    run = backend.lowrank_delta

    def recording(*a, **k):
        calls.append((a, k))
        run(*a, **k)

    def prefill(rid: str) -> None:
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        engine.generate([Request(rid, prompt_token_ids=PROMPT, adapter="a", params=params)])

    prefill("warm")  # compiles
    backend.lowrank_delta = recording
    prefill("recorded")
    backend.lowrank_delta = run
    Counting.launches = 0
    for a, k in calls:
        run(*a, **k)
    launches = Counting.launches
    plain = (triton_lowrank_rows.cdiv, triton_lowrank_rows.pow2_at_least)
    remembering = backend.check_lowrank_args
    forms = {  # the argument check, the launchers' host arithmetic
        "now": (remembering, plain),
        "checks_every_call": (checks.check_lowrank_args, plain),
        "triton_constexpr": (checks.check_lowrank_args, (triton.cdiv, triton.next_power_of_2)),
    }

    def replay(form, r: int) -> None:
        backend.check_lowrank_args = form[0]
        host_arithmetic(*form[1])
        for _ in range(args.repeat):
            for a, k in calls:
                run(*a, **k)

    try:
        ms = alternate(forms, args.rounds, replay)
    finally:
        backend.check_lowrank_args = remembering
        host_arithmetic(*plain)
    us = {name: [t * 1e3 / (args.repeat * len(calls)) for t in v] for name, v in ms.items()}
    p50 = {name: statistics.median(v) for name, v in us.items()}
    result = {
        "environment": environment(),
        "triton": triton.__version__,
        "prefill": {"tokens": len(PROMPT), "layers": widths["num_hidden_layers"],
                    "lora": "rank-16 all-linear", "lowrank_delta_calls": len(calls),
                    "launches_per_call": launches / len(calls)},
        "us_per_call_p50": p50,
        "now_over": {name: p50["now"] / v for name, v in p50.items() if name != "now"},
        "saved_us_per_call": {name: v - p50["now"] for name, v in p50.items() if name != "now"},
        "per_prefill_ms_p50": {name: v * len(calls) / 1e3 for name, v in p50.items()},
        "rounds_us": us,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("prefill", "us_per_call_p50", "now_over",
                                             "saved_us_per_call")}))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
