"""Registering an adapter from disk, against the same registration as it was done before,
alternated in one process: (1) the safetensors library's reader, which copies every tensor out
of the file's bytes, a finiteness sum per tensor, and registration waiting for the file's hash
(how server/adapters/files.py did it at a9de700); (2) the same with the finiteness checked
tensor by tensor and the hash computed before parsing (before 3b6df1b). Then the adapter's slot
write (what its first request does before its prefill): DeviceSlots.write_lora against the
same write module by module, casts, copies, scalar writes and the CPU backend's packing each
their own ops per module (how server/adapters/slots.py wrote before), also alternated.

    .venv/bin/python -m bench.registration [--rounds 12] [--rank 16] [--out PATH]
        # -> bench/results/registration_cpu.json

SmolLM2-135M (the default model), bf16, 2 threads, a rank-16 LoRA on every linear module of
every layer (PEFT's format, fp32 tensors as PEFT saves them: 420 tensors, 17 MB), written to
disk once per round (four files, reused), registered with `engine.adapters.register` (what the
server's RegisterAdapter runs: read, hash, parse, validate, and keep) and unregistered, each
registration after the last one's hash is done (the hash now finishes after registration
returns: on this 2-core machine it would otherwise take a core from the next). The forms
alternate, each first in turn; medians of the rounds. On the CPU backend a slot write also
packs the slot for the C++ kernels (per module in the old form, a projection's layers at once
now). On a GPU, the per-module form's 420 copies each waited for the device, and the op counts
(tests/unit/test_slot_buffers.py) matter more than here: bench/gpu_engine.py's cold start
times that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import Future
from pathlib import Path

import torch
from safetensors.torch import load

from bench.common import alternate, environment
from bench.multi_adapter import ALL, write_lora
from peftserve.adapters import files
from peftserve.adapters.lora import LoraWeights
from peftserve.adapters.slots import GROUP_OF, DeviceSlots
from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.kernels.cpu_packed import pack_lora


class _Inline:
    """An executor that runs each task at once, on the caller's thread."""

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done


def library_safetensors(source: files.SourceDir, name: str, per_tensor: bool = False) -> dict:
    """SourceDir.safetensors as it was (a9de700): the file read whole into bytes, hashed (on
    the hashers' executor), the safetensors library's reader copying each tensor out, then a
    fp32 sum per tensor, stacked (`per_tensor`: an isfinite per tensor, as before 3b6df1b)."""
    path = source.path / name
    resolved = str(path.resolve(strict=True))
    with open(resolved, "rb") as f:
        data = f.read()
    source._read[name] = files.FileDigest(resolved, files._HASHERS.submit(files._sha256, data))
    tensors = load(data)
    if per_tensor:
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    else:
        assert bool(torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()])
                    .isfinite().all())  # fmt: skip
    return tensors


def waited_digests(source: files.SourceDir) -> dict:
    """SourceDir.digests as it was: registration waited for every hash."""
    for digest in source._read.values():
        digest.hashing.result()
    return dict(source._read)


def per_module_write(slots: DeviceSlots, slot: int, weights: LoraWeights) -> None:
    """DeviceSlots.write_lora as it was, module by module (its buffers already allocated)."""
    slots.clear(slot)
    for (layer, proj), mod in weights.modules.items():
        group, i = GROUP_OF[proj]
        buf = slots.lora[(layer, group)]
        r = mod.A.shape[0]
        off = sum(buf.slice_sizes[:i])
        rows = buf.B[slot, off : off + buf.slice_sizes[i]]
        hw = buf.written[i][slot]
        if hw > r:
            buf.A[i, slot, r:hw].zero_()
            rows[:, r:hw].zero_()
        buf.A[i, slot, :r] = mod.A.to(slots.dtype)
        rows[:, :r] = mod.B.to(slots.dtype)
        buf.written[i][slot] = r
        buf.rank[i, slot] = r
        buf.scale[i, slot] = mod.scale
    if slots.packed is not None:
        for layer, group in {(layer, GROUP_OF[proj][0]) for layer, proj in weights.modules}:
            buf = slots.lora[(layer, group)]
            slots.packed[(layer, group)][slot] = pack_lora(
                buf.A, buf.B, buf.rank, buf.scale, slot, buf.slice_sizes
            )
    slots.version += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/registration_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_config(EngineConfig(model="default", dtype="bfloat16", max_loras=8,
                                             max_lora_rank=max(64, args.rank)))  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="peftserve-registration-"))
    paths = [write_lora(root / f"a{i}", engine.model.shape, args.rank, ALL, seed=i)
             for i in range(4)]  # fmt: skip
    mb = (paths[0] / "adapter_model.safetensors").stat().st_size / 1e6
    now = (files.SourceDir.safetensors, files.SourceDir.digests, files._HASHERS)
    forms = {  # name: (SourceDir.safetensors, SourceDir.digests, the hashes' executor)
        "now": now,
        "library_reader_waited_hash": (library_safetensors, waited_digests, files._HASHERS),
        "tensor_by_tensor_inline_hash": (
            lambda source, name: library_safetensors(source, name, per_tensor=True),
            waited_digests,
            _Inline(),
        ),
    }

    def register(form, r: int) -> None:
        files.SourceDir.safetensors, files.SourceDir.digests, files._HASHERS = form
        engine.adapters.register(f"r{r}", paths[r % len(paths)])

    def unregister(r: int) -> None:
        for digest in engine.registry.get(f"r{r}").files.values():
            digest.hashing.result()  # the hash done before the next registration
        engine.adapters.unregister(f"r{r}")

    try:
        ms = alternate(forms, args.rounds, register, unregister)
    finally:
        files.SourceDir.safetensors, files.SourceDir.digests, files._HASHERS = now
    p50 = {name: statistics.median(v) for name, v in ms.items()}

    slots = engine.adapters.slots
    loaded = [engine.registry.load_from_disk(p).lora for p in paths]
    slots.write_lora(0, loaded[0])  # the buffers allocated, as after the server's first adapter
    writes = {"now": slots.write_lora, "per_module": lambda *a: per_module_write(slots, *a)}
    write_ms = alternate(writes, args.rounds,
                         lambda write, r: write(1 + r % 4, loaded[r % len(loaded)]))  # fmt: skip
    write_p50 = {name: statistics.median(v) for name, v in write_ms.items()}
    result = {
        "environment": environment(),
        "threads": args.threads,
        "adapter": {"kind": "lora", "rank": args.rank, "targets": ALL, "file_MB": mb},
        "register_ms_p50": p50,
        "now_over_before": p50["now"] / p50["library_reader_waited_hash"],
        "now_over_first": p50["now"] / p50["tensor_by_tensor_inline_hash"],
        "rounds_ms": ms,
        "slot_write": {
            "backend": type(slots.backend).__name__,
            "ms_p50": write_p50,
            "now_over_before": write_p50["now"] / write_p50["per_module"],
            "rounds_ms": write_ms,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("register_ms_p50", "now_over_before",
                                             "now_over_first")}))  # fmt: skip
    print(json.dumps({k: result["slot_write"][k] for k in ("ms_p50", "now_over_before")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
