"""Compiles every Triton kernel the engine launches for a CUDA GPU, on a machine without one.

    python -m tests.kernels.gpu_compile [--arch 90] [--shapes smollm2,llama-3.1-8b]
    python -m tests.kernels.gpu_compile --lora-tiles     # gpu.sh's LoRA tile sweep's tiles

The interpreter (the kernel tests on the CPU) runs a kernel's Python, not what Triton's compiler
makes of it: a construct the compiler rejects, a shared-memory overflow or a type error in a
branch the tests' shapes never take only shows on a GPU. Here a Triton driver that compiles
for the given architecture and launches nothing (`CompileOnly`) stands in for CUDA, and the
engine runs its steps on the CPU with the Triton backend, so each kernel is compiled, through
ptxas to a cubin, with the arguments the engine gives it: the shapes' real widths and head
layouts (bench/random_weights.py) with one or two layers, every dtype the GPU serves, LoRAs of
ranks 8 to 64 on every projection, a bottleneck adapter, prefix and prompt tuning, prompts long
enough to split decode attention over the context, prefill (segment kernels) and the static
decode step (per-token kernels). The kernels write nothing, so the tokens are meaningless;
the engine's sampling does not mind.

Decode steps run in the form a CUDA graph captures (tests/eager_graphs.py: rows padded to the
buckets, the bodies of cuda_graphs.DecodeGraphs), eagerly, under a dispatch mode that records
every op a graph cannot hold (`.item()` and the like, outputs sized by the data) with the line
that called it.

One JSON line per compiled kernel (name, shape, dtype, its constexprs, shared memory, warps,
registers per thread, local memory, i.e. spills, and global loads, all and 16-byte ones, from
cuobjdump), then one
`{"summary": ...}` line (with the host syncs found in captured steps). Exits non-zero when a
compile fails. TRITON_INTERPRET must be off before triton is first imported: it is removed here.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.random_weights import SHAPES  # noqa: E402
from peftserve.config import EngineConfig  # noqa: E402
from peftserve.engine.engine import Engine  # noqa: E402
from peftserve.engine.request import Request  # noqa: E402
from peftserve.engine.sampling_params import SamplingParams  # noqa: E402
from peftserve.layers.triton_backend import TritonBackend  # noqa: E402
from tests import adapters as A  # noqa: E402
from tests.eager_graphs import EagerBuckets  # noqa: E402
from tests.tiny import make_model_dir  # noqa: E402

# The served dtypes per shape (fp32 and fp16 at the small shape only: compile time).
DTYPES = {"smollm2": ("bfloat16", "float16", "float32"), "llama-3.1-8b": ("bfloat16",)}
LAYERS = {"smollm2": 2, "llama-3.1-8b": 1}
H200_SHARED_BYTES = 232448  # per block, opt-in (sm_90)


class _Utils:
    def __init__(self, shared: int, compiled: list[dict]) -> None:
        self.shared, self.compiled = shared, compiled

    def load_binary(self, name, cubin, shared, device):  # module, function, regs, spills, threads
        usage = resource_usage(cubin)
        self.compiled[-1].update(usage)  # launcher_cls's entry
        return name, name, usage["registers"], usage["local_bytes"], 1024

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": self.shared, "multiprocessor_count": 132, "warpSize": 32}


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread, local memory bytes (spills) and global load instructions (all, and
    those of 16 bytes; into registers or, for a dot's operands, into shared memory) of one
    kernel, from Triton's bundled cuobjdump."""
    cuobjdump = Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = [
            subprocess.run([str(cuobjdump), flag, f.name], capture_output=True, text=True,
                           check=True).stdout
            for flag in ("--dump-resource-usage", "-sass")
        ]  # fmt: skip
    usage = dict(re.findall(r"\b(REG|LOCAL):(\d+)", dump[0]))
    loads = re.findall(r"\b(?:LDG|LDGSTS)((?:\.\w+)*)\s", dump[1])  # LDGSTS: cp.async
    wide = sum(".128" in x for x in loads)
    return {"registers": int(usage["REG"]), "local_bytes": int(usage["LOCAL"]),
            "global_loads": len(loads), "global_loads_16B": wide}  # fmt: skip


class CompileOnly:
    """A Triton driver for `target` that compiles kernels and launches nothing."""

    def __init__(self, target: GPUTarget, shared: int = H200_SHARED_BYTES) -> None:
        self.target = target
        self.compiled: list[dict] = []
        self.utils = _Utils(shared, self.compiled)
        self.context: dict = {}

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):  # called once per compiled kernel, on first launch
        names = src.fn.arg_names
        constexprs = {names[path[0]]: v for path, v in src.constants.items()
                      if len(path) == 1 and isinstance(v, int | bool | str)}  # fmt: skip
        pointers = sorted({t for t in src.signature.values() if t.startswith("*")})
        self.compiled.append({
            "kernel": src.fn.__name__, **self.context, "pointers": pointers,
            "constexprs": constexprs, "shared_bytes": metadata.shared,
            "num_warps": metadata.num_warps,
        })  # fmt: skip
        return lambda *args, **kwargs: None


# Ops a CUDA graph cannot hold: each reads a device value on the host (a sync, refused while a
# stream captures) or sizes its output by the data.
HOST_SYNC_OPS = {
    "aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.equal",
    "aten.is_nonzero", "aten.multinomial", "aten.repeat_interleave",
}  # fmt: skip


ROOT = str(Path(__file__).resolve().parents[2]) + "/"
SOURCES = (ROOT + "server/", ROOT + "kernels/")  # the package, not the tests


class CaptureLint(TorchDispatchMode):
    """Records the ops in HOST_SYNC_OPS, and indexing by a boolean mask, with the line of
    peftserve that called them."""

    def __init__(self, found: list[dict]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        masked = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, list | tuple) for i in a
        )  # fmt: skip
        if name in HOST_SYNC_OPS or masked:
            frames = reversed(traceback.extract_stack())
            where = next((f"{f.filename.removeprefix(ROOT)}:{f.lineno}" for f in frames
                          if f.filename.startswith(SOURCES)), "?")  # fmt: skip
            self.found.append({"op": name, "where": where})
        return func(*args, **(kwargs or {}))


def adapters_for(model_dir: Path, out: Path, small: bool) -> dict[str, Path]:
    made = {
        "lora-all-r16": A.make_lora(model_dir, out / "l16", r=16, seed=1, targets=A.ALL_LINEAR),
        "lora-qv-r64": A.make_lora(model_dir, out / "l64", r=64, seed=2),
        # bottleneck size 36 at SmolLM2's width, 64 (the largest rank served) at 8B's
        "houlsby": A.make_bottleneck(
            model_dir, out / "houlsby", "houlsby", seed=3, reduction_factor=16 if small else 64
        ),
    }
    if small:  # no kernel specializations beyond the three above: at one shape only
        made |= A.every_kind(model_dir, out, ("lora", "pfeiffer", "prefix", "prompt"))
    return made


def run_shape(shape: str, work: Path, fake: CompileOnly, syncs: list[dict]) -> int:
    """Runs `shape`'s engine in each of its dtypes; returns the captured-form steps run."""
    widths = {
        k: v for k, v in SHAPES[shape].items() if k not in ("vocab_size", "tie_word_embeddings")
    }
    widths.update(num_hidden_layers=LAYERS[shape], max_position_embeddings=2048)
    model_dir = make_model_dir(work / shape, **widths)
    adapters = adapters_for(model_dir, work / f"{shape}-adapters", shape == "smollm2")
    words = "the quick brown fox jumps over the lazy dog ".split()
    prompts = [" ".join(words[: 2 + i]) for i in range(len(adapters) + 1)]
    prompts.append(" ".join(words * 40))  # > 256 positions: decode attention splits
    names = [None, *adapters, None]
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True)
    drawn = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.8, top_k=20,
                           top_p=0.9, repetition_penalty=1.3, seed=5)  # fmt: skip
    replays = 0
    backend = TritonBackend()
    backend.captures_graphs = False  # graphs and pinned buffers need CUDA; the same kernels
    # and once more in the first dtype with each LoRA's whole delta begun before its base matmul
    # (config.lora_overlap "delta": the expand into a float32 delta of its own)
    runs = [*((d, "off") for d in DTYPES[shape]), (DTYPES[shape][0], "delta")]
    for dtype, overlap in runs:
        fake.context = {"shape": shape, "dtype": dtype, "lora_overlap": overlap}
        config = EngineConfig(model=str(model_dir), dtype=dtype, device="cpu", block_size=16,
                              num_kv_blocks=256, max_loras=8, max_num_batched_tokens=256,
                              decode_step="static", cuda_graphs=False,
                              lora_overlap=overlap)  # fmt: skip
        engine = Engine.from_config(config, backend)
        graphs = EagerBuckets.install(engine, 16, lambda: CaptureLint(syncs))
        for name, path in adapters.items():
            engine.adapters.register(name, path)
        reqs = [Request(f"r{i}", prompt=p, adapter=a, params=drawn if i % 3 == 1 else greedy)
                for i, (p, a) in enumerate(zip(prompts, names, strict=True))]  # fmt: skip
        engine.generate(reqs)
        replays += graphs.replays
    return replays


def run_tiles(fake: CompileOnly) -> None:
    """The one-launch LoRA kernels under every tile gpu.sh's sweep times
    (bench/decode_kernels.SWEEP_TILES), launched as the sweep does, at Llama-3.1-8B's module
    sizes in bf16: a tile that cannot compile fails here, not in the GPU's few minutes."""
    from bench.decode_kernels import N_SLOTS, R_MAX, SWEEP_TILES, kernel_tiles, lora_modules
    from peftserve.kernels.lora_tiles import Tiles
    from peftserve.kernels.triton_lowrank_stages import lowrank_delta_rows_triton

    bf16 = torch.bfloat16
    for tile in SWEEP_TILES:
        fields = kernel_tiles(tile)
        tiles = (Tiles(**fields["shrink"]), Tiles(**fields["expand"]))
        for module, (d_in, slices) in lora_modules("llama-3.1-8b").items():
            fake.context = {"shape": "llama-3.1-8b", "dtype": "bfloat16", "tiles": tile,
                            "module": module}  # fmt: skip
            n, out = len(slices), sum(slices)
            A = torch.empty(n, N_SLOTS, R_MAX, d_in, dtype=bf16)
            B = torch.empty(N_SLOTS, out, R_MAX, dtype=bf16)
            rank = torch.zeros(n, N_SLOTS, dtype=torch.int32)
            for batch in (8, 32):  # the shrink's splits (its grid) differ, not its constants
                x, y = torch.empty(batch, d_in, dtype=bf16), torch.empty(batch, out, dtype=bf16)
                lowrank_delta_rows_triton(y, x, A, B, rank, torch.zeros(n, N_SLOTS),
                                          torch.zeros(batch, dtype=torch.long), slices,
                                          tiles=tiles)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90,
                    help="CUDA compute capability, e.g. 80, 90 (shared memory is checked "
                         "against the H200's limit)")  # fmt: skip
    ap.add_argument("--shapes", default="smollm2,llama-3.1-8b")
    ap.add_argument("--lora-tiles", action="store_true",
                    help="instead of the engine: the LoRA kernels under gpu.sh's sweep tiles")
    args = ap.parse_args()
    fake = CompileOnly(GPUTarget("cuda", args.arch, 32))
    driver.set_active(fake)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    failed, syncs, replays = None, [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in [] if args.lora_tiles else args.shapes.split(","):
            try:
                replays += run_shape(shape, Path(tmp), fake, syncs)
            except Exception as e:  # a compile error: report it with where it happened
                failed = f"{shape} {fake.context.get('dtype')}: {type(e).__name__}: {e}"
                break
        if args.lora_tiles:
            try:
                run_tiles(fake)
            except Exception as e:  # noqa: BLE001 - reported as the summary's failure
                failed = f"tiles {fake.context.get('tiles')}: {type(e).__name__}: {e}"
    for entry in fake.compiled:
        print(json.dumps(entry))
    unique_syncs = [dict(t) for t in sorted({tuple(d.items()) for d in syncs})]
    print(json.dumps({"summary": {"arch": args.arch, "compiled": len(fake.compiled),
                                  "failed": failed, "captured_form_steps": replays,
                                  "host_syncs_in_captured_steps": unique_syncs}}))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
