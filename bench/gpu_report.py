"""The GPU issue's must-shows, read from one `bench/gpu.sh` run's files, as a Markdown table.

    python -m bench.gpu_report OUT_DIR   # the directory gpu.sh wrote ($OUT)

Each goal's number is taken from the JSON that holds it (gpu_engine_8b.json and gpu_engine.json:
bench/gpu_engine.py at Llama-3.1-8B's and SmolLM2's shapes; decode_kernels_cuda.json and
decode_fused_ops_cuda.json: bench/decode_kernels.py), each test step's exit status from
steps.log. A number the run did not write (a step that failed or ran out of time) shows as
missing and fails its goal. Needs no GPU: gpu.sh runs it last, and it reruns on copied files.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Goal:
    what: str
    file: str
    path: tuple[str, ...]  # keys into the file's JSON
    bound: float
    at_most: bool  # True: value <= bound; False: value >= bound

    def check(self, value: float | None) -> bool:
        if value is None:
            return False
        return (operator.le if self.at_most else operator.ge)(value, self.bound)


def _engine_goals(file: str, shape: str, floor: float, vs_generate: float) -> list[Goal]:
    steps = [Goal(f"{shape}: decode step / floor, batch {b}", file,
                  ("decode_floor", str(b), "step_over_floor"), floor, True)
             for b in (1, 8, 32)]  # fmt: skip
    return [*steps, Goal(f"{shape}: engine / `generate` (one batch of 32)", file,
                         ("throughput", "speedup_vs_hf_batch32"), vs_generate, False)]  # fmt: skip


GOALS = [
    *_engine_goals("gpu_engine_8b.json", "Llama-3.1-8B", 1.25, 3.0),
    *_engine_goals("gpu_engine.json", "SmolLM2", 2.5, 5.0),
    Goal("Llama-3.1-8B: 32 q,v LoRAs / base tok/s", "gpu_engine_8b.json",
         ("adapters", "lora-qv", "vs_base"), 0.90, False),
    Goal("SmolLM2: 32 q,v LoRAs / base tok/s", "gpu_engine.json",
         ("adapters", "lora-qv", "vs_base"), 0.80, False),
    Goal("Llama-3.1-8B: 32 all-linear LoRAs / base tok/s", "gpu_engine_8b.json",
         ("adapters", "lora-heavy", "vs_base"), 0.70, False),
    Goal("SmolLM2: cold register -> first token p50, ms", "gpu_engine.json",
         ("cold_register_to_first_token_ms", "p50"), 40.0, True),
]  # fmt: skip
TEST_STEPS = ("engine_cuda_tests", "kernel_tests", "native_kernels")
ENGINE_FILES = (("gpu_engine_8b.json", "Llama-3.1-8B"), ("gpu_engine.json", "SmolLM2"))


def dig(data: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) else None


def read_json(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def step_status(out: Path) -> dict[str, str]:
    """Each step's outcome from steps.log, "exit RC" ("== NAME: exit RC in S s") or "skipped"
    (no time left in the run's budget); the last line wins."""
    try:
        text = (out / "steps.log").read_text()
    except OSError:
        return {}
    return {m[1]: m[2] for m in re.finditer(r"^== (\S+): (exit \d+|skipped)", text, re.M)}


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.3g}"


def goal_lines(out: Path) -> tuple[list[str], int]:
    """The goals' table and how many are not met."""
    lines = ["| goal | value | bound | met |", "|---|---|---|---|"]
    unmet = 0
    for goal in GOALS:
        value = dig(read_json(out, goal.file), goal.path)
        met = goal.check(value)
        unmet += not met
        bound = f"{'<=' if goal.at_most else '>='} {goal.bound:g}"
        lines.append(f"| {goal.what} | {_fmt(value)} | {bound} | {'yes' if met else 'NO'} |")
    status = step_status(out)
    for step in TEST_STEPS:
        shown = status.get(step, "missing")
        met = shown == "exit 0"
        unmet += not met
        lines.append(f"| tests: {step} | {shown} | exit 0 | {'yes' if met else 'NO'} |")
    return lines, unmet


def kernel_lines(out: Path, name: str, op: str, best: Callable[[dict], str]) -> list[str]:
    """One line per row of `op` in decode_kernels' JSON `name`: GB/s of each method, replayed
    from a CUDA graph, the largest difference between the methods' outputs, and the device's
    copy rate in the same run."""
    data = read_json(out, name)
    if data is None:
        return [f"- {name}: missing"]
    copy = data.get("device_copy_gbs")
    lines = [f"- {name}: device copy {_fmt(copy)} GB/s (read + write)"]
    for row in data.get("rows", []):
        if row.get("op") != op:
            continue
        rates = ", ".join(f"{m} {_fmt(v)}" for m, v in row.get("gbs_graph", {}).items())
        label = " ".join(str(x) for x in (row["shape"], row.get("module")) if x)
        lines.append(f"  - {label} batch {row['batch']}: GB/s {rates}; {best(row)}; max |diff| "
                     f"between the methods {_fmt(row.get('max_abs_diff'))}")  # fmt: skip
    return lines


def _fastest(row: dict) -> str:
    ms = {m: v for m, v in row.get("graph_ms", {}).items() if v}
    return f"fastest: {min(ms, key=ms.__getitem__)}" if ms else "no timings"


def _fastest_and_compile(row: dict) -> str:
    """A fused op's row: the fastest method and torch.compile's first call at these sizes."""
    return f"{_fastest(row)}; Inductor's first call {_fmt(row.get('inductor_first_call_s'))} s"


def _lora_beside(row: dict) -> str:
    """An overlap row (decode_kernels.py --ops overlap): what the module's LoRA work adds to
    its matmul in each form, us graph-replayed."""
    ms = row.get("graph_ms", {})
    alone = ms.get("matmul_alone")
    if not alone:
        return "no timings"
    added = ", ".join(f"{m} {_fmt((ms[m] - alone) * 1e3)}" for m in
                      ("lora_after", "shrink_beside", "delta_beside") if ms.get(m))  # fmt: skip
    return f"matmul alone {_fmt(alone * 1e3)} us, the LoRA adds (us): {added}"


def lora_overlap_lines(out: Path) -> list[str]:
    """gpu.sh's opt-in overlap_kernels step, where it ran."""
    if read_json(out, "decode_overlap_cuda.json") is None:
        return []
    return ["Each module's matmul with its 32 LoRAs after it, or their work beside it:",
            *kernel_lines(out, "decode_overlap_cuda.json", "overlap", _lora_beside)]


def tile_ranking(out: Path) -> tuple[list[str], dict[str, float], dict[tuple, dict], list[dict]]:
    """The lora_tiles step's tiles, the least total graph-replayed time over the cells every
    tile ran first; those totals; each cell's rows by tile; the cells every tile ran."""
    data = read_json(out, "decode_lora_tiles_cuda.json") or {}
    cells: dict[tuple, dict[str, dict]] = {}
    for row in data.get("rows", []):
        if (row.get("op") == "lora_tiles" and row.get("graph_ms", {}).get("rows_one_launch")
                and not wrong_sums(row)):
            key = (row["shape"], row.get("module"), row["batch"])
            cells.setdefault(key, {})[row["tiles"]] = row
    tiles = sorted({t for per in cells.values() for t in per})
    common = [per for per in cells.values() if set(per) == set(tiles)]
    total = {t: sum(per[t]["graph_ms"]["rows_one_launch"] for per in common) for t in tiles}
    return sorted(tiles, key=total.__getitem__), total, cells, common


def tile_lines(out: Path) -> list[str]:
    """gpu.sh's opt-in lora_tiles step (decode_lora_tiles_cuda.json; nothing when it did not
    run): each tile's total, the least first (the tiles to make the default), then each cell's
    GB/s by tile; and the lora_tiles_engine step's 8B adapters section under the fastest."""
    ranked, total, cells, common = tile_ranking(out)
    rows = [r for r in (read_json(out, "decode_lora_tiles_cuda.json") or {}).get("rows", [])
            if r.get("op") == "lora_tiles"]  # fmt: skip
    failed = [f"{r['tiles']} at batch {r.get('batch')}: {r['error'][:200]}" for r in rows
              if r.get("error")]  # fmt: skip
    if not ranked and not failed:
        return []
    lines = ["", "One-launch LoRA kernels by tile (N:warps:K:warps[:rank chunk[:shrink "
             "programs[:shrink ranks a program]]], decode_lora_tiles_cuda.json):",
             f"- total ms over the {len(common)} cells every tile ran, least first: "
             + ", ".join(f"{t} {_fmt(total[t])}" for t in ranked)]  # fmt: skip
    lines += [f"- FAILED {f}" for f in failed]
    lines += [f"- WRONG SUMS {r['tiles']} {r.get('module')} at batch {r.get('batch')}: max |diff| "
              f"{_fmt(r.get('max_abs_diff'))} against the segment kernels (left out of the "
              "table)" for r in rows if "error" not in r and wrong_sums(r)]  # fmt: skip
    stages = {t: [sum(per[t].get("stage_graph_ms", {}).get(k) or 0.0 for per in common)
                  for k in ("shrink", "expand")] for t in ranked}  # fmt: skip
    if any(sum(v) for v in stages.values()):
        lines.append("- the same cells, each kernel timed apart (shrink / expand ms): "
                     + ", ".join(f"{t} {_fmt(a)} / {_fmt(b)}"
                                 for t, (a, b) in stages.items()))  # fmt: skip
    for (shape, module, batch), per in cells.items():
        rates = ", ".join(f"{t} {_fmt(per[t]['gbs_graph']['rows_one_launch'])}"
                          for t in sorted(per))  # fmt: skip
        best = min(per, key=lambda t: per[t]["graph_ms"]["rows_one_launch"])
        lines.append(f"  - {shape} {module} batch {batch}: GB/s {rates}; fastest: {best}")
    return lines + layer_lines(cells)


def layer_lines(cells: dict[tuple, dict[str, dict]]) -> list[str]:
    """Per shape and batch, a layer's LoRA pairs (every module the sweep timed) under the
    kernels' defaults (SWEEP_TILES[0]) against each module at its fastest tile, as the tuned
    table gives them: what the table saves a layer, in us."""
    from bench.decode_kernels import SWEEP_TILES

    default = SWEEP_TILES[0]
    layers: dict[tuple, dict[str, dict]] = {}
    for (shape, module, batch), per in cells.items():
        layers.setdefault((shape, batch), {})[module] = per
    lines = []
    for (shape, batch), modules in sorted(layers.items()):
        if not all(default in per for per in modules.values()):
            continue
        us = {m: {t: row["graph_ms"]["rows_one_launch"] * 1e3 for t, row in per.items()}
              for m, per in modules.items()}  # fmt: skip
        best = {m: min(times, key=times.__getitem__) for m, times in us.items()}
        before = sum(t[default] for t in us.values())
        after = sum(us[m][b] for m, b in best.items())
        each = ", ".join(f"{m} {_fmt(us[m][default])} -> {_fmt(us[m][b])} {b}"
                         for m, b in best.items())  # fmt: skip
        lines.append(f"- {shape} batch {batch}, a layer's LoRA pairs: {_fmt(before)} us under "
                     f"the defaults ({default}), {_fmt(after)} us each at its fastest ({each})")
    return lines


# gpu.sh's opt-in reruns of the 8B adapters section: (file, what it changes)
VARIANTS = (
    ("gpu_engine_8b_tiles.json", ""),
    ("gpu_engine_8b_overlap_delta.json", ", each LoRA's whole delta beside its base matmul"),
    ("gpu_engine_8b_overlap_shrink.json", ", each LoRA's shrink beside its base matmul"),
)


def variant_lines(out: Path) -> list[str]:
    """The opt-in reruns of the 8B adapters section (lora_tiles_engine, lora_overlap_engine):
    each configuration's tok/s against base and its decode step at batch 32, next to
    engine_bench_8b's under the defaults."""
    lines = []
    for name, what in VARIANTS:
        engine = read_json(out, name)
        if engine is None:
            continue
        configs = ("lora-qv", "lora-heavy")
        ratios = ", ".join(f"{c} {_fmt(dig(engine, ('adapters', c, 'vs_base')))}" for c in configs)
        steps = ", ".join(f"{c} {_fmt(dig(engine, ('adapters', c, 'decode_step_ms')))}"
                          for c in ("base", *configs))  # fmt: skip
        under = engine.get("lora_tile_table") or engine.get("lora_tiles")
        lines.append(f"- Llama-3.1-8B's adapters section under {under}{what} ({name}), tok/s "
                     f"vs base: {ratios}; decode step ms at batch 32: {steps}")  # fmt: skip
    return lines


def best_tile(out: Path) -> str:
    """The lora_tiles step's fastest tile; "" when it has none."""
    return (tile_ranking(out)[0] or [""])[0]


# A tile whose sums differ more than this from the segment kernels' (max |diff| over a
# module's outputs, bf16: the sweep's rows agree to 0.008-0.016, a rounding of values of 2-4)
# computed something else: the table never takes it.
TILE_DIFF_LIMIT = 0.1


def wrong_sums(row: dict) -> bool:
    """Whether a lora_tiles row's kernels disagree with the segment kernels (or did not say)."""
    diff = row.get("max_abs_diff")
    return diff is None or not diff <= TILE_DIFF_LIMIT  # NaN too


def tuned_tiles(out: Path) -> dict:
    """The lora_tiles step's fastest tile for each module and batch, by the time of its pair of
    kernels replayed in a graph (graph_ms rows_one_launch), both kernels' entries from that one
    tile: the expand's time depends on the shrink's (its splits are the partial sums each
    expand program adds up), so a shrink and an expand each fastest in another tile's company
    need not be fastest together. As a kernels/lora_tiles.py table file: {"device", "from",
    "entries"}, each entry with the tile string and the pair's time it was chosen by."""
    from bench.decode_kernels import kernel_tiles

    data = read_json(out, "decode_lora_tiles_cuda.json") or {}
    best: dict[tuple, tuple[float, str]] = {}
    for row in data.get("rows", []):
        ms = (row.get("graph_ms") or {}).get("rows_one_launch")
        if row.get("op") != "lora_tiles" or "d_in" not in row or not ms or wrong_sums(row):
            continue
        key = (row["d_in"], tuple(row["slices"]), row["r_max"], row["batch"])
        if key not in best or ms < best[key][0]:
            best[key] = (ms, row["tiles"])
    entries = [{"kernel": kernel, "in": d_in, "slices": list(slices), "r_max": r_max,
                "batch": batch, **kernel_tiles(tile)[kernel], "tiles": tile, "graph_ms": ms}
               for (d_in, slices, r_max, batch), (ms, tile) in sorted(best.items())
               for kernel in ("shrink", "expand")]  # fmt: skip
    return {"device": data.get("device"), "from": str(out / "decode_lora_tiles_cuda.json"),
            "entries": entries}  # fmt: skip


def run_lines(out: Path) -> list[str]:
    """The machine (gpu.sh's environment check) and, per shape, the engine's start-up: load and
    graph capture, and the adapters section's writing and registering of its 64 adapters."""
    try:
        env = (out / "gpu_env.log").read_text().splitlines()[0]
    except (OSError, IndexError):
        env = "missing"
    lines = [f"- machine: {env}"]
    for name, shape in ENGINE_FILES:
        data = read_json(out, name)
        seconds = {what: dig(data, (key,)) for what, key in (
            ("engine start", "engine_start_s"), ("of it graph capture", "cuda_graph_capture_s"),
            ("adapters written and registered", "adapters_written_and_registered_s"))}
        parts = [f"{what} {_fmt(v)}{'' if v is None else ' s'}" for what, v in seconds.items()]
        lines.append(f"- {shape}: {', '.join(parts)}")
        for section, error in ((data or {}).get("errors") or {}).items():
            lines.append(f"- {shape}: section {section} failed: {error}")
    return lines


def cold_lines(out: Path) -> list[str]:
    """Where the cold start's time went: registration, the slot write (the first request
    less the same adapter's next one; and timed alone where the run did), the prefill with the
    adapter and without."""
    data = read_json(out, "gpu_engine.json")
    parts = {k: dig(data, ("cold_register_to_first_token_ms", k)) for k in (
        "register_p50", "first_request_p50", "resident_first_token_p50", "base_first_token_p50")}
    if None in parts.values():
        return ["- cold start: no breakdown in gpu_engine.json"]
    write = parts["first_request_p50"] - parts["resident_first_token_p50"]
    alone = dig(data, ("cold_register_to_first_token_ms", "slot_write_p50"))
    captures = ((data or {}).get("cold_register_to_first_token_ms") or {}).get("graph_capture_ms")
    asides = []
    if alone is not None:
        asides.append(f"the slot write alone, synchronized, {_fmt(alone)}")
    if captures:
        asides.append("graph captures inside the first requests, ms: "
                      + ", ".join(_fmt(t) for t in captures))  # fmt: skip
    timed = f" ({'; '.join(asides)})" if asides else ""
    lines = [f"- cold start p50 parts, ms: registration {_fmt(parts['register_p50'])}, slot write "
             f"and other first-use costs {_fmt(write)}{timed}, prefill with the adapter "
             f"{_fmt(parts['resident_first_token_p50'])} (the base model's "
             f"{_fmt(parts['base_first_token_p50'])})"]  # fmt: skip
    prof = (data or {}).get("cold_profile")
    if prof:
        for key, ms, label in (("by_cumulative", "cumulative_ms", "in them"),
                               ("by_own", "own_ms", "their own")):  # fmt: skip
            top = ", ".join(f"{r['function']} {r[ms]:.1f} x{r['calls']}" for r in prof[key][:12])
            lines.append(f"- one cold start under cProfile ({_fmt(prof['total_ms'])} ms), the "
                         f"functions by ms {label}: {top}")
    return lines


def phase_lines(out: Path) -> list[str]:
    """Per shape, the adapters section's run of each configuration by its steps' phases
    (bench.common.step_phases): ms in steps with prompt tokens and in decode-only steps, and
    their counts; where a configuration's tok/s against base is lost."""
    lines = []
    for name, shape in ENGINE_FILES:
        adapters = (read_json(out, name) or {}).get("adapters", {})
        parts = [f"{config} {_fmt(a['phases']['prefill'][1])} / {_fmt(a['phases']['decode'][1])} "
                 f"({a['phases']['prefill'][0]} / {a['phases']['decode'][0]})"
                 for config, a in adapters.items() if "phases" in a]  # fmt: skip
        if parts:
            lines.append(f"- {shape}, the adapters section's run by phase, ms in prefill / "
                         f"decode steps (steps): {'; '.join(parts)}")  # fmt: skip
    return lines


def overlap_lines(out: Path) -> list[str]:
    """Per shape, at each batch of the floor section, the decode step with the graphs: as
    served (the next step scheduled ahead, the outputs made while it runs), each step
    scheduled after the last one's tokens, and that with each step's outputs made in it."""
    lines = []
    for name, shape in ENGINE_FILES:
        floor = (read_json(out, name) or {}).get("decode_floor", {})
        keys = ("decode_step_ms", "no_ahead_decode_step_ms", "no_overlap_decode_step_ms")
        rows = [f"batch {b}: {' / '.join(_fmt(row.get(k)) for k in keys)}"
                for b, row in floor.items()]  # fmt: skip
        lines.append(f"- {shape}, decode step ms, as served / not scheduled ahead / neither "
                     f"ahead nor outputs overlapped: {'; '.join(rows) or 'missing'}")  # fmt: skip
    return lines


def profile_lines(out: Path, top: int = 8) -> list[str]:
    """Per shape and profiled configuration: kernels a step, the device's busy time a step
    against the unprofiled step's time at that batch (the floor section's, or the adapters
    section's at batch 32), and the kernels that take the most device time."""
    lines = []
    for name, shape in ENGINE_FILES:
        data = read_json(out, name) or {}
        runs = [(f"base, batch {b}", p, ("decode_floor", b, "decode_step_ms"))
                for b, p in data.get("profile", {}).items()]  # fmt: skip
        runs += [(f"{config}, batch 32", a["profile"], ("adapters", config, "decode_step_ms"))
                 for config, a in data.get("adapters", {}).items() if "profile" in a]  # fmt: skip
        if not runs:
            lines.append(f"- {shape}: no profile")
        for label, prof, step_path in runs:
            busy, step = prof.get("device_busy_us_per_step"), dig(data, step_path)
            share = f"{busy / (step * 1e3):.0%}" if busy and step else "missing"
            kernels = ", ".join(f"{k['kernel'][:60]} {k['us_per_step']:.0f} us "
                                f"x{k['launches_per_step']:.0f}" for k in prof.get("top", [])[:top])
            lines.append(f"- {shape}, {label}: {_fmt(prof.get('kernels_per_step'))} kernels, "
                         f"device busy {_fmt(busy)} us a step = {share} of the step "
                         f"({_fmt(step)} ms); most time: {kernels}")  # fmt: skip
    return lines


def report(out: Path) -> tuple[str, int]:
    lines, unmet = goal_lines(out)
    text = [f"# bench/gpu.sh in {out}", "", *lines, "", *run_lines(out), *cold_lines(out), "",
            "Where a decode step's device time goes (torch.profiler, gpu_engine.py --sections "
            "profile):", *profile_lines(out), *overlap_lines(out), *phase_lines(out), "",
            "Shrink/expand (one launch per stage) and the segment kernels:",
            *kernel_lines(out, "decode_kernels_cuda.json", "lora", _fastest), *tile_lines(out),
            *variant_lines(out), *lora_overlap_lines(out),
            "",
            "Paged decode attention against gather + SDPA:",
            *kernel_lines(out, "decode_kernels_cuda.json", "attention", _fastest), "",
            "Fused small ops against torch.compile's fusion of the same code:",
            *kernel_lines(out, "decode_fused_ops_cuda.json", "fused", _fastest_and_compile)]
    return "\n".join(text) + "\n", unmet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the directory bench/gpu.sh wrote")
    ap.add_argument("--best-tile", action="store_true",
                    help="print only the lora_tiles step's fastest tile (exit 1: none)")
    ap.add_argument("--tuned-tiles", action="store_true",
                    help="print only the lora_tiles step's fastest tile per kernel, module and "
                         "batch as a LoRA tile table (kernels/lora_tiles.py; exit 1: none)")
    args = ap.parse_args()
    if args.best_tile:
        tile = best_tile(args.out)
        print(tile)
        return 0 if tile else 1
    if args.tuned_tiles:
        table = tuned_tiles(args.out)
        print(json.dumps(table, indent=1))
        return 0 if table["entries"] else 1
    text, unmet = report(args.out)
    sys.stdout.write(text)
    print(f"{unmet} goal(s) not met" if unmet else "every goal met")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
