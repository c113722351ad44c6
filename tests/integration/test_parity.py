"""Our forward pass against transformers' own model on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from tests.device import DEVICE
from tests.tiny import make_model_dir

PROMPTS = ["the quick brown fox", "hello world, how are you today?", "low rank", "0 1 2 3 4 +"]


def engine_for(path, **kw) -> Engine:
    return Engine.from_config(
        EngineConfig(
            model=str(path), dtype="float32", device=DEVICE, num_kv_blocks=128, block_size=4, **kw
        )
    )


def check_logits(path, prompts=PROMPTS) -> None:
    engine = engine_for(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in prompts:
        ids = engine.tokenizer(p)["input_ids"]
        ours = engine.score(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert engine.block_manager.num_used == 0


def test_llama_logits_match_transformers(tiny_llama_dir):
    check_logits(tiny_llama_dir)


def test_qwen2_with_qkv_bias_logits_match_transformers(tiny_qwen2_dir):
    check_logits(tiny_qwen2_dir)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True),
        dict(num_key_value_heads=4),  # plain multi-head attention
        dict(num_key_value_heads=1, head_dim=32),  # MQA, head_dim != hidden/heads
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ],
    ids=["tied", "mha", "mqa-headdim", "llama3-rope", "linear-rope"],
)
def test_config_variants_match_transformers(tmp_path, overrides):
    check_logits(make_model_dir(tmp_path, seed=3, **overrides), PROMPTS[:2])


def test_greedy_generation_matches_transformers_generate(tiny_llama_dir):
    # A small token budget forces chunked prefill across steps.
    engine = engine_for(tiny_llama_dir, max_num_batched_tokens=5)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reqs = [Request(str(i), prompt=p, params=params) for i, p in enumerate(PROMPTS)]
    results = engine.generate(reqs)
    for r in reqs:
        ids = torch.tensor([engine.tokenizer(r.prompt)["input_ids"]])
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[
            0, ids.shape[1] :
        ]
        ours = [t for o in results[r.request_id] for t in o.token_ids]
        assert ours == ref.tolist()
    assert engine.block_manager.num_used == 0
