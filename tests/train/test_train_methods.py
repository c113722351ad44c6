"""Every method on the tiny Llama: the loss falls, and the saved directory, registered in
peftserve's engine, generates exactly what PEFT (or the injected bottleneck reference) does with
the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftserve.config import EngineConfig
from peftserve.engine.engine import Engine
from peftserve.models.loader import load_tokenizer
from peftserve.train import methods
from peftserve.train.config import TrainConfig
from peftserve.train.data import collate, encode, read_jsonl
from peftserve.train.loop import target_loss
from tests import adapters as A
from tests.integration.test_adapter_parity import oracle_greedy, ours_greedy
from tests.train.conftest import METHODS

PROMPTS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "user", "content": "the lazy dog"}],
]


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls(trained, method):
    out = trained(method)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_eval_loss"] < 0.8 * metrics["initial_eval_loss"]
    steps = metrics["step_losses"]
    assert sum(steps[-3:]) / 3 < 0.8 * sum(steps[:3]) / 3
    assert metrics["best_epoch"] >= 1
    assert 0 < metrics["trainable_params"] < metrics["base_params"]
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, len(metrics["epochs"]) + 1))
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_config.json",
                 "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "training_config.json").read_text())
    assert config["method"] == method and config["epochs"] == 3


def _oracle(method: str, model_dir, out):
    if method == "adapter":
        return A.bottleneck_reference(model_dir, out)
    return A.peft_model(model_dir, out)


@pytest.mark.parametrize("method", METHODS)
def test_registered_adapter_generates_like_the_oracle(trained, tiny_train_dir, method):
    out = trained(method)
    engine = Engine.from_config(EngineConfig(model=str(tiny_train_dir), dtype="float32",
                                             num_kv_blocks=128, block_size=4))
    engine.adapters.register("trained", out)
    oracle = _oracle(method, tiny_train_dir, out)
    virtual = json.loads((out / "adapter_config.json").read_text()).get("num_virtual_tokens", 0)
    skip = virtual if method == "prompt" else 0  # PEFT returns logits for the virtual rows too
    for messages in PROMPTS:
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        ours = engine.score(ids, adapter="trained")
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([ids])).logits[0, skip:]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        assert (ours - engine.score(ids)).abs().max() > 1e-2  # training changed the output
        assert ours_greedy(engine, ids, "trained") == oracle_greedy(oracle, ids, 12)


def test_bottleneck_file_layout(trained):
    out = trained("adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peftserve_type"] == "BOTTLENECK"
    assert config["architecture"] == "houlsby" and config["reduction_factor"] == 8
    tensors = load_file(out / "adapter_model.safetensors")
    # 2 layers x (mh_adapter, output_adapter) x (down, up) x (weight, bias); hidden 64 / 8 = 8
    assert len(tensors) == 16
    assert tensors["layers.1.mh_adapter.down.weight"].shape == (8, 64)
    assert tensors["layers.0.output_adapter.up.weight"].abs().max() > 0


def test_prefix_starts_as_real_tokens_in_front_of_the_prompt(tiny_train_dir):
    """The untrained prefix holds the base model's keys/values for V random tokens: the adapted
    model equals the base model reading those tokens first."""
    config = TrainConfig(method="prefix", data=Path("unused.jsonl"), out=Path("unused"),
                         num_virtual_tokens=5, seed=3)
    adapted = methods.build(config, A.base_model(tiny_train_dir)).model.eval()
    base = A.base_model(tiny_train_dir)
    virtual = torch.randint(base.config.vocab_size, (1, 5),
                            generator=torch.Generator().manual_seed(3))
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ours = adapted(input_ids=prompt).logits[0]
        ref = base(input_ids=torch.cat([virtual, prompt], dim=1)).logits[0, 5:]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_target_loss_equals_the_models_own_loss(tiny_train_dir, toy_data, method):
    """Logits only where a target follows, shifted past prompt tuning's virtual tokens: the same
    mean loss transformers / PEFT compute from full logits and `labels`."""
    config = TrainConfig(method=method, data=toy_data["train"], out=Path("unused"),
                         num_virtual_tokens=3)
    adapted = methods.build(config, A.base_model(tiny_train_dir))
    if method == "lora":  # make the adapter do something
        with torch.no_grad():
            for name, p in adapted.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    tok = load_tokenizer(tiny_train_dir)
    batch = collate(encode(read_jsonl(toy_data["train"])[:6], tok, 512), tok.pad_token_id)
    model = adapted.model.eval()
    with torch.no_grad():
        loss_sum, n = target_loss(model, batch, adapted.input_offset)
        ref = model(**batch).loss
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-5, rtol=1e-5)
