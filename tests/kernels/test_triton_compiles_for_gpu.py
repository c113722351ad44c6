"""Every Triton kernel compiles for the H200 (sm_90) as the engine launches it, without a GPU.

The other kernel tests run the kernels under the interpreter on the CPU, which executes their
Python and accepts what Triton's compiler may not. tests/kernels/gpu_compile.py runs the engine
on the CPU with the Triton backend and a driver that compiles each launch through ptxas for
sm_90 and launches nothing, at SmolLM2's and Llama-3.1-8B's widths, in bf16, fp16 and fp32;
cuobjdump reads each cubin's registers and local memory (spills). The same run checks the
decode step's captured form for ops a CUDA graph cannot hold.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def kernels_in_source() -> set[str]:
    names = set()
    for path in (ROOT / "kernels").glob("triton_*.py"):
        names |= set(re.findall(r"@triton\.jit\ndef (_\w+_kernel)\(", path.read_text()))
    return names


@pytest.fixture(scope="module")
def child() -> list[dict]:
    """The child's JSON lines: one per compiled kernel, then its summary."""
    if torch.cuda.is_available():  # and bench/gpu.sh's time limits have no room for this
        pytest.skip("with CUDA at hand the kernel tests run every kernel compiled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "tests.kernels.gpu_compile", "--arch", "90"]
    # One child per shape and one for gpu.sh's LoRA tile sweep, at once (each runs on one
    # thread: two cores, less time), their lines joined as one child's.
    children = [subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for args in (("--shapes", "smollm2"), ("--shapes", "llama-3.1-8b"),
                             ("--lora-tiles",))]  # fmt: skip
    try:
        outputs = [run.communicate(timeout=600) for run in children]
    finally:
        for run in children:
            if run.poll() is None:
                run.kill()
    compiled, summaries = [], []
    for run, (stdout, stderr) in zip(children, outputs, strict=True):
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert lines and "summary" in lines[-1], stdout[-2000:] + stderr[-4000:]
        summary = lines[-1]["summary"]
        assert run.returncode == 0 and summary["failed"] is None, (
            summary["failed"] or stderr[-4000:]
        )
        compiled += lines[:-1]
        summaries.append(summary)
    syncs = [s for summary in summaries for s in summary["host_syncs_in_captured_steps"]]
    return [*compiled, {"summary": {
        "captured_form_steps": sum(s["captured_form_steps"] for s in summaries),
        "host_syncs_in_captured_steps": syncs,
    }}]  # fmt: skip


def test_every_kernel_compiles_in_every_served_dtype(child):
    compiled = child[:-1]
    expected = kernels_in_source()
    assert len(expected) >= 9, expected  # the source scan itself works
    for dtype in ("bfloat16", "float16", "float32"):
        seen = {c["kernel"] for c in compiled if c["shape"] == "smollm2" and c["dtype"] == dtype}
        assert seen == expected, (dtype, expected - seen)


def test_both_attention_forms_and_the_8b_layout_compile(child):
    compiled = child[:-1]
    attention = [c["constexprs"] for c in compiled if c["kernel"] == "_paged_decode_kernel"]
    assert {a["ONE_PASS"] for a in attention} == {True, False}  # short contexts, split ones
    assert {(a["GROUP"], a["HEAD_DIM"]) for a in attention} == {(3, 64), (4, 128)}
    norms = {c["constexprs"]["BLOCK"] for c in compiled if c["kernel"] == "_rms_norm_kernel"}
    assert norms == {1024, 4096}  # hidden 576 and 4096, padded
    # The fp32 segment shrink is the largest user of shared memory: it fits an SM of sm_90.
    assert max(c["shared_bytes"] for c in compiled) <= 232448


def test_the_lora_expand_into_a_delta_of_its_own_compiles(child):
    """config.lora_overlap "delta": the expand writes a float32 delta where y is bf16, a
    specialization of its own (compiled, without spills, as the rest)."""
    delta = {c["shape"] for c in child[:-1]
             if c["kernel"] == "_expand_rows_kernel" and c.get("lora_overlap") == "delta"}
    assert delta == {"smollm2", "llama-3.1-8b"}


def test_every_tile_the_gpu_sweep_times_compiles(child):
    """gpu.sh's lora_tiles step launches the LoRA kernels under each of SWEEP_TILES: each
    compiles for sm_90 (and, as every kernel here, without spills: the test below), the
    shrink's programs of a few ranks each (rank_grid) among them."""
    from bench.decode_kernels import SWEEP_TILES, kernel_tiles

    swept = [c for c in child[:-1] if "tiles" in c]
    assert {c["tiles"] for c in swept} <= set(SWEEP_TILES) and SWEEP_TILES[0] in {
        c["tiles"] for c in swept}  # fmt: skip
    # each tile's shrink form (a kernel compiled once serves every tile of the same constants)
    shrinks = {(c["num_warps"], c["constexprs"]["RANK_GRID"]) for c in swept
               if c["kernel"] == "_shrink_rows_kernel"}  # fmt: skip
    wanted = {(f["warps"], f["rank_grid"]) for f in
              (kernel_tiles(t)["shrink"] for t in SWEEP_TILES)}  # fmt: skip
    assert wanted <= shrinks and {16, 32} <= {grid for _, grid in shrinks}, (wanted, shrinks)
    expands = {(c["constexprs"]["BLOCK_N"], c["num_warps"]) for c in swept
               if c["kernel"] == "_expand_rows_kernel"}  # fmt: skip
    assert {(kernel_tiles(t)["expand"]["block"], kernel_tiles(t)["expand"]["warps"])
            for t in SWEEP_TILES} <= expands  # fmt: skip


def test_no_kernel_spills_registers(child):
    """Local memory is where ptxas puts what does not fit in registers: slow on the GPU."""
    compiled = child[:-1]
    spills = [(c["kernel"], c["shape"], c["dtype"], c["constexprs"]) for c in compiled
              if c["local_bytes"]]  # fmt: skip
    assert not spills, spills
    assert all(0 < c["registers"] <= 255 for c in compiled)


def test_the_per_token_lora_kernels_read_weights_16_bytes_at_a_time(child):
    """In half precision the decode step's LoRA kernels load whole 16-byte vectors of A and of
    B (with a mask on the exact rank they could not: one load per element)."""
    rows = [c for c in child[:-1] if c["kernel"] in ("_shrink_rows_kernel", "_expand_rows_kernel")
            and c["dtype"] != "float32"]  # fmt: skip
    assert {c["kernel"] for c in rows} == {"_shrink_rows_kernel", "_expand_rows_kernel"}
    scalar = [(c["kernel"], c["shape"], c["constexprs"]) for c in rows if not c["global_loads_16B"]]
    assert not scalar, scalar


def test_the_captured_decode_step_reads_nothing_on_the_host(child):
    """The bodies cuda_graphs.DecodeGraphs captures (forward with and without adapter deltas,
    greedy and drawing samplers), run eagerly on rows padded to its buckets: no op among them
    reads a device value on the host or sizes its output by the data (either one fails a
    capture, or makes the server fall back to eager steps)."""
    summary = child[-1]["summary"]
    assert summary["captured_form_steps"] > 0
    assert summary["host_syncs_in_captured_steps"] == []
