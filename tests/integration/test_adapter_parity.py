"""Every adapter kind against an oracle no one here wrote: PEFT for LoRA / prefix / prompt
tuning, transformers with injected modules for bottlenecks, the base model for templates."""

from __future__ import annotations

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests import adapters as A
from tests.device import DEVICE

PROMPTS = ["the quick brown fox", "hello world, how are you today?", "low rank"]
NEW = 12


def engine_for(model_dir, **kw) -> Engine:
    kw = {"num_kv_blocks": 256, "block_size": 4, "max_lora_rank": 64, **kw}
    return Engine.from_config(
        EngineConfig(model=str(model_dir), dtype="float32", device=DEVICE, **kw)
    )


def oracle_greedy(model, ids: list[int], n: int, virtual: int = 0) -> list[int]:
    """A greedy loop over forward(): PEFT's generate() drops prefix tuning (see REFERENCE)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def ours_greedy(engine: Engine, ids: list[int], adapter: str | None, n: int = NEW) -> list[int]:
    res = engine.generate(
        [
            Request(
                "g",
                prompt_token_ids=tuple(ids),
                adapter=adapter,
                params=SamplingParams(max_new_tokens=n, ignore_eos=True),
            )
        ]
    )
    return [t for o in res["g"] for t in o.token_ids]


def check(engine: Engine, oracle, name: str, virtual: int = 0) -> None:
    for p in PROMPTS:
        ids = engine.tokenizer(p)["input_ids"]
        ours = engine.score(ids, adapter=name)
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([ids])).logits[0, virtual:]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        assert (ours - engine.score(ids)).abs().max() > 1e-2  # the adapter does change the output
        assert ours_greedy(engine, ids, name) == oracle_greedy(oracle, ids, NEW)
    assert engine.block_manager.num_used == sum(
        len(e.prefix.blocks) for e in engine.registry.entries() if e.prefix is not None
    )


@pytest.mark.parametrize(
    "lora_kw",
    [
        dict(r=1),
        dict(r=3),
        dict(r=8),
        dict(r=64, alpha=32),
        dict(r=8, targets=A.ALL_LINEAR),
        dict(
            r=8,
            targets=A.ALL_LINEAR,
            rank_pattern={"v_proj": 3, "down_proj": 5},
            alpha_pattern={"q_proj": 4},
        ),
        dict(r=16, use_rslora=True, targets=["q_proj", "k_proj", "up_proj"]),
    ],
    ids=["r1", "r3", "r8", "r64", "all-linear", "rank-alpha-pattern", "rslora"],
)
def test_lora_matches_peft(tiny_llama_dir, tmp_path, lora_kw):
    path = A.make_lora(tiny_llama_dir, tmp_path / "lora", **lora_kw)
    engine = engine_for(tiny_llama_dir)
    engine.adapters.register("a", path)
    check(engine, A.peft_model(tiny_llama_dir, path), "a")


def test_lora_on_qwen2_with_bias_matches_peft(tiny_qwen2_dir, tmp_path):
    path = A.make_lora(tiny_qwen2_dir, tmp_path / "lora", r=4, targets=A.ALL_LINEAR)
    engine = engine_for(tiny_qwen2_dir)
    engine.adapters.register("a", path)
    check(engine, A.peft_model(tiny_qwen2_dir, path), "a")


@pytest.mark.parametrize("virtual", [3, 4, 9])  # below, at and above the block size (4)
def test_prefix_tuning_matches_peft_forward(tiny_llama_dir, tmp_path, virtual):
    path = A.make_prefix_tuning(tiny_llama_dir, tmp_path / "prefix", virtual=virtual)
    engine = engine_for(tiny_llama_dir)
    engine.adapters.register("p", path)
    check(engine, A.peft_model(tiny_llama_dir, path), "p")


@pytest.mark.parametrize("virtual", [2, 4, 7])
def test_prompt_tuning_matches_peft(tiny_llama_dir, tmp_path, virtual):
    path = A.make_prompt_tuning(tiny_llama_dir, tmp_path / "prompt", virtual=virtual)
    engine = engine_for(tiny_llama_dir)
    engine.adapters.register("p", path)
    check(engine, A.peft_model(tiny_llama_dir, path), "p", virtual=virtual)


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("houlsby", {}),
        ("pfeiffer", {}),
        ("houlsby", dict(non_linearity="gelu", scaling=0.5, reduction_factor=8)),
    ],
    ids=["houlsby", "pfeiffer", "gelu-scaled-rf8"],
)
def test_bottleneck_matches_injected_reference(tiny_llama_dir, tmp_path, arch, kw):
    path = A.make_bottleneck(tiny_llama_dir, tmp_path / "bn", architecture=arch, **kw)
    engine = engine_for(tiny_llama_dir)
    engine.adapters.register("b", path)
    check(engine, A.bottleneck_reference(tiny_llama_dir, path), "b")


def test_template_equals_base_model_on_the_rendered_prompt(tiny_llama_dir, tmp_path):
    path = A.make_template(
        tmp_path / "t",
        system="Answer briefly.",
        few_shot=[{"user": "hello", "assistant": "world"}],
        chain_of_thought="think step by step",
    )
    engine = engine_for(tiny_llama_dir)
    engine.adapters.register("t", path)
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "low rank\nthink step by step"},
    ]
    text = engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    hf = A.base_model(tiny_llama_dir)
    for prompt in ["low rank"]:
        seq = engine.add_request(
            Request(
                "t1",
                prompt=prompt,
                adapter="t",
                params=SamplingParams(max_new_tokens=NEW, ignore_eos=True),
            )
        )
        assert engine.tokenizer.decode(seq.prompt_token_ids) == text
        assert seq.prefix_len > 0
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        ours = [t for o in outs for t in o.token_ids]
        assert ours == oracle_greedy(hf, seq.prompt_token_ids, NEW)
