"""TritonBackend (server/layers/backend.py) against the reference backend: each op it replaces on
the shapes a decode step gives it, then the tiny engine's greedy tokens, base and adapters
(LoRA on every projection, a bottleneck) in one batch, in fp32. On the CPU the kernels run
under the interpreter (slow: the engine run is kept to a few short requests); on a GPU
(bench/gpu.sh) compiled."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.layers.attention import AttentionMetadata
from peftserve.layers.backend import Backend
from peftserve.layers.triton_backend import TritonBackend
from tests import adapters as A
from tests.eager_graphs import EagerBuckets
from tests.kernels.lowrank_cases import KERNEL_DEVICE, assert_close

DEV = torch.device(KERNEL_DEVICE)


class CountedTritonBackend(TritonBackend):
    """TritonBackend with its decode attention and adapter-delta calls (by segments, by
    per-token slot) counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def decode_attention(self, *args: Any) -> torch.Tensor:
        self.calls["decode_attention"] += 1
        return super().decode_attention(*args)

    def lowrank_delta(self, *args: Any, **kwargs: Any) -> None:
        self.calls["lowrank_delta"] += 1
        super().lowrank_delta(*args, **kwargs)

    def lowrank_delta_tokens(self, *args: Any, **kwargs: Any) -> None:
        self.calls["lowrank_delta_tokens"] += 1
        super().lowrank_delta_tokens(*args, **kwargs)

    def lowrank_begin_tokens(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["lowrank_begin_tokens"] += 1
        self.calls[f"whole={kwargs.get('whole')}"] += 1
        return super().lowrank_begin_tokens(*args, **kwargs)

    def lowrank_end_tokens(self, *args: Any, **kwargs: Any) -> None:
        self.calls["lowrank_end_tokens"] += 1
        super().lowrank_end_tokens(*args, **kwargs)


def test_decode_ops_match_the_reference():
    """One decode step's ops at SmolLM2's head layout (9 query heads on 3 KV heads)."""
    g = torch.Generator().manual_seed(0)
    ref, tri = Backend(), TritonBackend()
    T, heads, kv_heads, D, bs = 3, 9, 3, 16, 4
    h, r, w = (torch.randn(T, 40, generator=g).to(DEV) for _ in range(3))
    assert_close(tri.rms_norm(h, w[0], 1e-5), ref.rms_norm(h, w[0], 1e-5), 1e-5, 1e-5)
    for a, b in zip(tri.add_rms_norm(h, r, w[0], 1e-5), ref.add_rms_norm(h, r, w[0], 1e-5),
                    strict=True):  # fmt: skip
        assert_close(a, b, 1e-5, 1e-5)
    gate_up = torch.randn(T, 2 * 24, generator=g).to(DEV)
    assert_close(tri.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), 1e-6, 1e-6)

    lens = torch.tensor([1, 6, 11])
    tables = torch.tensor([[4, 0, 0], [2, 7, 0], [1, 3, 5]])
    slot_mapping = torch.stack([tables[b, (n - 1) // bs] * bs + (n - 1) % bs
                                for b, n in enumerate(lens.tolist())])  # fmt: skip
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=g).to(DEV)
    angles = torch.randn(T, 1, D // 2, generator=g)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEV) for f in (torch.cos, torch.sin))
    caches = [torch.randn(2, kv_heads, 8 * bs, D, generator=g).to(DEV)]
    caches.append(caches[0].clone())
    mask = (torch.arange(3 * bs)[None, :] < lens[:, None])[:, None, None, None, :]
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(DEV), num_decodes=T, block_size=bs,
        decode_blocks=tables.to(DEV), decode_mask=mask.to(DEV), decode_lens=lens.to(DEV),
        prefills=(),
    )  # fmt: skip
    outs = []
    for backend, cache in zip((ref, tri), caches, strict=True):
        q, _, _ = backend.rotary_and_cache(qkv.clone(), cos, sin, cache, meta.slot_mapping,
                                           heads, kv_heads)  # fmt: skip
        outs.append(backend.decode_attention(q, cache, meta, D**-0.5))
    assert_close(caches[1], caches[0], 1e-6, 1e-6)
    assert_close(outs[1], outs[0], 1e-5, 1e-5)


def test_engine_greedy_tokens_match_the_reference(tiny_llama_dir, tmp_path):
    lora = A.make_lora(tiny_llama_dir, tmp_path / "lora", r=8, seed=2, targets=A.ALL_LINEAR)
    houlsby = A.make_bottleneck(tiny_llama_dir, tmp_path / "houlsby", "houlsby", seed=4)
    prompts = [("the quick brown fox", None), ("hello world", "lora"),
               ("low rank adaptation", "houlsby")]  # fmt: skip
    results = []
    triton_backend = CountedTritonBackend()
    # Graphs (and the pinned buffers they copy from) need a GPU; under the interpreter the
    # engine runs its steps eagerly.
    triton_backend.captures_graphs = DEV.type == "cuda"
    for backend in (Backend(), triton_backend):
        config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", device=KERNEL_DEVICE,
                              block_size=4, num_kv_blocks=64, max_loras=4)  # fmt: skip
        engine = Engine.from_config(config, backend)
        engine.adapters.register("lora", lora)
        engine.adapters.register("houlsby", houlsby)
        reqs = [Request(f"r{i}", prompt=p, adapter=a,
                        params=SamplingParams(max_new_tokens=3, ignore_eos=True))
                for i, (p, a) in enumerate(prompts)]  # fmt: skip
        out = engine.generate(reqs)
        results.append({rid: [t for o in outs for t in o.token_ids] for rid, outs in out.items()})
    assert all(len(t) == 3 for t in results[0].values())
    assert results[1] == results[0]
    assert triton_backend.calls["decode_attention"] and triton_backend.calls["lowrank_delta"]


@pytest.mark.parametrize(("lora_overlap", "prefill_rows"), [
    ("off", "graphs"), ("shrink", "graphs"), ("delta", "graphs"), ("delta", "always"),
])  # fmt: skip
def test_the_decode_step_as_graphs_capture_it_gives_the_reference_tokens(tiny_llama_dir, tmp_path,
                                                                         lora_overlap,
                                                                         prefill_rows):  # fmt: skip
    """The path a GPU serves by default: the static decode step in the form its CUDA graphs
    capture (rows padded to the buckets, block tables at full width so attention splits,
    adapter deltas by per-token slot), here eagerly with the Triton kernels, against the
    reference backend's classic steps; every adapter kind in one batch, some requests still
    prefilling while others decode. lora_overlap: each LoRA's delta in two halves, the shrink
    (or with "delta" the whole delta) before the base matmul (here on the one stream there is;
    on CUDA test_cuda_graphs.py). prefill_rows "always": short prefills as rows of the same
    step too (on CUDA in half precision by default)."""
    dirs = A.every_kind(tiny_llama_dir, tmp_path)
    words = "the quick brown fox jumps over the lazy dog".split()
    reqs = [Request(f"r{i}", prompt=" ".join(words[i % 5 : i % 5 + 2 + i % 3]),
                    adapter=([None, *dirs])[i % (len(dirs) + 1)],
                    params=SamplingParams(max_new_tokens=4 + i % 4, ignore_eos=True,
                                          logprobs=True))
            for i in range(9)]  # fmt: skip
    results = []
    for decode_step, backend in (("classic", Backend()), ("static", CountedTritonBackend())):
        backend.captures_graphs = False  # no CUDA here: the captured form is set up below
        config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", device=KERNEL_DEVICE,
                              block_size=4, num_kv_blocks=128, max_loras=8, max_model_len=320,
                              max_num_batched_tokens=24, decode_step=decode_step,
                              lora_overlap=lora_overlap, prefill_rows=prefill_rows)  # fmt: skip
        engine = Engine.from_config(config, backend)
        for name, path in dirs.items():
            engine.adapters.register(name, path)
        if decode_step == "static":
            buckets = EagerBuckets.install(engine, 8)  # 1, 2, 4, 8: 9 rows run unpadded
            step, as_rows = engine.runner.static, []
            launch = step.launch_rows
            step.launch_rows = (lambda items, launch=launch, as_rows=as_rows:
                                as_rows.append(launch(items)) or as_rows[-1])
        out = engine.generate(reqs)
        results.append({rid: ([t for o in outs for t in o.token_ids],
                              [p for o in outs for p in o.logprobs or ()])
                        for rid, outs in out.items()})  # fmt: skip
    assert buckets.replays > 0 and backend.calls["lowrank_delta_tokens"]  # (bottlenecks')
    split = backend.calls["lowrank_begin_tokens"]
    assert split == backend.calls["lowrank_end_tokens"] and (split > 0) == (lora_overlap != "off")
    assert backend.calls["whole=True"] == (split if lora_overlap == "delta" else 0)
    assert any(r is not None for r in as_rows) == (prefill_rows == "always")
    for rid, (tokens, logprobs) in results[0].items():
        assert results[1][rid][0] == tokens, rid
        assert results[1][rid][1] == pytest.approx(logprobs, abs=1e-4), rid
