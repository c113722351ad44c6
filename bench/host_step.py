"""Host time of a captured decode step, without a GPU: what `Engine.step` spends on the host
around the replays of a CUDA graph step (scheduling, filling and uploading the step's buffers,
reading the sampled ids back, the outputs and their text). On a GPU the next step's host work
waits for this step's ids, so this time adds to every decode step's device time.

    .venv/bin/python -m bench.host_step [--batches 1 8 32 64] [--steps 64] [--profile]
        # -> bench/results/host_step_cpu.json

The engine runs the static decode step (decode_step="static") on the CPU with a stand-in for
engine/cuda_graphs.DecodeGraphs whose replay computes nothing and writes token 7 for every row,
so the step is its host part alone: the model is the tests' tiny Llama on the torch backend (its
size and kernels do not enter; the C++ kernels' background build would).
`batch` requests of a 12-token prompt, greedy, EOS ignored; half of them with a rank-16 LoRA
(--adapters) so the adapter graph path runs. The median of the decode steps in ms, per batch
size; --profile prints cProfile's top functions at the largest batch.

    .venv/bin/python -m bench.host_step --device-ms 1 4 [--rounds 3]
        # -> bench/results/host_step_ahead_cpu.json

--device-ms: the stand-in's replay takes that long, as a device would: replays queue one
after another, and the wait for a step's sampled ids spins until its replay ends (as the wait
for a CUDA event does; a sleep's wake-up added up to 0.6 ms a step here). Each batch
runs as served where graphs replay (the next step scheduled ahead, EngineConfig.schedule_ahead,
and the outputs made while it runs, overlap_outputs), with only the outputs overlapped, and
with neither, alternated `--rounds` times: the step's time is then the device's plus whatever
host work cannot hide behind it. A model of the device, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from bench.common import environment
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.tiny import make_model_dir


class NullGraphs:
    """DecodeGraphs' interface: every batch size is a bucket, a replay samples token 7 and
    takes `device_s` of a stand-in device: replays queue on it one after another, and the
    wait for a step's ids spins until its replay ends."""

    def __init__(self, step, device_s: float = 0.0) -> None:
        self.step, self.replays, self.device_s = step, 0, device_s
        self.done: deque[float] = deque()  # when each replay not yet waited for ends
        self.busy_until = 0.0
        if device_s:
            results = step._results

            def waiting(seqs, turn):
                if self.done:  # (a step that only samples replays nothing)
                    end = self.done.popleft()
                    while time.perf_counter() < end:  # spins, as a wait on a CUDA event does
                        pass
                return results(seqs, turn)

            step._results = waiting

    def bucket(self, n: int) -> int:
        return n

    def prepare(self, rows: int, adapters: frozenset | None) -> bool:
        """Nothing to capture: replay() computes nothing."""
        return True

    def replay(self, rows: int, adapters: frozenset | None, full: bool) -> None:
        self.busy_until = max(time.perf_counter(), self.busy_until) + self.device_s
        self.done.append(self.busy_until)
        self.step.out[0, :rows] = 7
        self.step.out[1, :rows] = 0
        self.replays += 1


def run(model_dir: Path, lora: Path | None, batch: int, steps: int,
        profile: cProfile.Profile | None, device_ms: float = 0.0,
        overlap: bool = True, ahead: bool = True) -> list[float]:  # fmt: skip
    engine = Engine.from_config(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", decode_step="static", backend="torch",
        max_num_seqs=batch, num_kv_blocks=batch * 8 + 64, block_size=16, max_model_len=128,
        max_loras=2, overlap_outputs=overlap, schedule_ahead=ahead))  # fmt: skip
    step = engine.runner.static
    assert step is not None
    step.graphs = graphs = NullGraphs(step, device_ms / 1e3)
    if lora is not None:
        engine.adapters.register("lora", lora)
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        adapter = "lora" if lora is not None and i % 2 else None
        engine.add_request(Request(f"r{i}", prompt="the quick brown fox jumps over the lazy dog "
                                   "low rank", adapter=adapter, params=params))  # fmt: skip
    times = []
    while engine.has_unfinished():
        replays = graphs.replays
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        if graphs.replays > replays:  # a decode step (the prefill is not one)
            times.append(elapsed * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--no-adapters", dest="adapters", action="store_false")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime, cumulative")
    parser.add_argument("--device-ms", type=float, nargs="*", default=[],
                        help="stand-in device time a step: overlap on and off, alternated")
    parser.add_argument("--rounds", type=int, default=3, help="with --device-ms")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model")
        lora = None
        if args.adapters:
            lora = A.make_lora(model_dir, Path(tmp) / "lora", r=16, targets=A.ALL_LINEAR)
        if args.device_ms:
            device_rows(model_dir, lora, args)
            return
        for batch in args.batches:
            profile = cProfile.Profile() if args.profile and batch == max(args.batches) else None
            times = run(model_dir, lora, batch, args.steps, profile)
            rows.append({"batch": batch, "decode_steps": len(times),
                         "host_ms_median": statistics.median(times),
                         "host_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            if profile is not None:
                pstats.Stats(profile).sort_stats(args.sort).print_stats(30)
    write(args, rows, "host_step_cpu.json")


def write(args: argparse.Namespace, rows: list[dict], name: str, **extra: str) -> None:
    """The rows, the command that made them and the machine -> args.out or results/NAME."""
    flags = [f"--batches {' '.join(map(str, args.batches))}", f"--steps {args.steps}"]
    if args.device_ms:
        flags += [f"--device-ms {' '.join(map(str, args.device_ms))}", f"--rounds {args.rounds}"]
    result = {
        "command": " ".join(["python -m bench.host_step", *flags,
                             *([] if args.adapters else ["--no-adapters"])]),
        "environment": environment(),
        **extra,
        "adapters": "half the requests with a rank-16 all-linear LoRA" if args.adapters
        else "none",
        "rows": rows,
    }  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / name
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


# (overlap_outputs, schedule_ahead) of each configuration --device-ms compares
CONFIGS = {"served": (True, True), "overlap_only": (True, False), "neither": (False, False)}


def device_rows(model_dir: Path, lora: Path | None, args: argparse.Namespace) -> None:
    rows = []
    for device_ms in args.device_ms:
        for batch in args.batches:
            medians: dict[str, list[float]] = {name: [] for name in CONFIGS}
            for _ in range(args.rounds):
                for name, (overlap, ahead) in CONFIGS.items():
                    times = run(model_dir, lora, batch, args.steps, None, device_ms, overlap,
                                ahead)  # fmt: skip
                    medians[name].append(statistics.median(times))
            step = {name: statistics.median(m) for name, m in medians.items()}
            rows.append({"device_ms": device_ms, "batch": batch,
                         **{f"step_ms_{name}": ms for name, ms in step.items()},
                         "served_over_neither": step["served"] / step["neither"],
                         "served_over_overlap_only": step["served"] / step["overlap_only"],
                         "rounds_ms": medians})  # fmt: skip
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds_ms"}),
                  flush=True)  # fmt: skip
    write(args, rows, "host_step_ahead_cpu.json",
          device="a stand-in: replays queue one after another, each takes device_ms, the "
                 "wait for a step's ids spins until its replay ends; a model of a device, "
                 "not a GPU")  # fmt: skip


if __name__ == "__main__":
    main()
