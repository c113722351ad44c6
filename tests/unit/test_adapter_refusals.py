"""Every refusal at registration names the problem and leaves nothing registered."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from peftserve.adapters import config_values
from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import SourceDir
from peftserve.adapters.loader import AdapterLimits, load_adapter
from peftserve.adapters.registry import validate_name
from peftserve.models.llama import ModelShape
from tests import adapters as A
from tests.tiny import make_model_dir


@pytest.fixture(scope="module")
def shape(tiny_llama_dir) -> ModelShape:
    return ModelShape.from_config(AutoConfig.from_pretrained(tiny_llama_dir))


@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory):
    return A.make_lora(tiny_llama_dir, tmp_path_factory.mktemp("lora") / "a", r=4)


def edited(src, tmp_path, config=None, tensors=None):
    out = shutil.copytree(src, tmp_path / "edited")
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(out / "adapter_model.safetensors")
        save_file(tensors(t), out / "adapter_model.safetensors")
    return out


def refused(path, shape, match, limits: AdapterLimits | None = None):
    with pytest.raises(InvalidAdapter, match=match):
        load_adapter(path, shape, limits or AdapterLimits(max_lora_rank=64))


def test_valid_lora_loads(lora_dir, shape):
    loaded = load_adapter(lora_dir, shape, AdapterLimits())
    assert loaded.ranks() == {"q": 4, "v": 4}
    assert loaded.num_params == 2 * shape.layers * 4 * (
        shape.hidden + shape.hidden
    ) - shape.layers * 4 * (shape.hidden - shape.kv_heads * shape.head_dim)


def test_pickle_weights_are_refused(lora_dir, shape, tmp_path):
    out = shutil.copytree(lora_dir, tmp_path / "pickle")
    torch.save(load_file(out / "adapter_model.safetensors"), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    refused(out, shape, "pickle")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "c_attn"]}, "lacks"),
        ({"bias": "all"}, "bias"),
        ({"r": 7}, "config says r=7"),
        ({"peft_type": "IA3"}, "unsupported adapter type"),
        ({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
    ],
)
def test_unsupported_lora_contents_are_refused(lora_dir, shape, tmp_path, config, match):
    refused(edited(lora_dir, tmp_path, config=config), shape, match)


def test_rank_above_the_limit_is_refused(lora_dir, shape):
    refused(lora_dir, shape, "max rank 2", AdapterLimits(max_lora_rank=2))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("dtypes", ["one", "mixed"])
def test_non_finite_weights_are_refused_naming_the_tensor(lora_dir, shape, tmp_path, value,
                                                          where, dtypes):  # fmt: skip
    bad = []

    def poison(t):
        keys = sorted(t)
        key = keys[0] if where == "first" else keys[-1]
        if dtypes == "mixed":
            other = keys[-1] if where == "first" else keys[0]
            t[other] = t[other].half()
        t[key].view(-1)[0 if where == "first" else -1] = value
        bad.append(key)
        return t

    path = edited(lora_dir, tmp_path, tensors=poison)
    refused(path, shape, re.escape(bad[0]) + " contains NaN or Inf")


def test_finite_weights_whose_sum_overflows_are_read(tmp_path):
    # the sums' check overflows (3e38 + 3e38 in fp32; 1e300 in fp32): tensor by tensor, finite
    save_file({"a": torch.full((2, 3), 3e38), "b": torch.full((4,), 1e300, dtype=torch.float64)},
              tmp_path / "w.safetensors")  # fmt: skip
    tensors = SourceDir(tmp_path).safetensors("w.safetensors")
    assert torch.equal(tensors["a"], torch.full((2, 3), 3e38))
    assert torch.equal(tensors["b"], torch.full((4,), 1e300, dtype=torch.float64))


def test_adapter_for_another_base_is_refused(shape, tmp_path):
    other = make_model_dir(tmp_path / "other", hidden_size=32, num_hidden_layers=3)
    path = A.make_lora(other, tmp_path / "lora-other", r=4)
    refused(path, shape, "do not fit|layers")
    deeper = make_model_dir(tmp_path / "deeper", num_hidden_layers=3)
    refused(A.make_lora(deeper, tmp_path / "lora-deeper", r=4), shape, "base model has 2 layers")


def test_unexpected_tensor_is_refused(lora_dir, shape, tmp_path):
    def extra(t):
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, shape.hidden)
        return t

    refused(edited(lora_dir, tmp_path, tensors=extra), shape, "unexpected tensor")


def test_prefix_and_prompt_tuning_for_another_base_are_refused(tiny_llama_dir, shape, tmp_path):
    other = make_model_dir(tmp_path / "other", hidden_size=32)
    refused(A.make_prefix_tuning(other, tmp_path / "prefix"), shape, "token_dim|width")
    refused(A.make_prompt_tuning(other, tmp_path / "prompt"), shape, "hidden")
    ok = A.make_prefix_tuning(tiny_llama_dir, tmp_path / "prefix-ok", virtual=5)
    refused(ok, shape, "num_virtual_tokens 5", AdapterLimits(max_virtual_tokens=4))


def test_bottleneck_refusals(tiny_llama_dir, shape, tmp_path):
    path = A.make_bottleneck(tiny_llama_dir, tmp_path / "bn", "houlsby")
    assert load_adapter(path, shape, AdapterLimits()).ranks() == {
        "mh_adapter": 4,
        "output_adapter": 4,
    }
    refused(edited(path, tmp_path / "a", config={"non_linearity": "tanh"}), shape, "tanh")
    refused(
        edited(path, tmp_path / "b", config={"reduction_factor": 128}), shape, "bottleneck size"
    )

    def drop(t):
        del t["layers.1.output_adapter.up.bias"]
        return t

    refused(edited(path, tmp_path / "c", tensors=drop), shape, "layers.1.output_adapter.up.bias")


def test_template_refusals(shape, tmp_path):
    refused(A.make_template(tmp_path / "empty", system=None, few_shot=[]), shape, "needs")
    bad = A.make_template(tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["few_shot"] = [{"user": "x"}]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    refused(bad, shape, "few_shot\\[0\\]")


def test_missing_or_broken_files_are_refused(shape, tmp_path):
    refused(tmp_path / "nope", shape, "not a directory")
    (tmp_path / "d").mkdir()
    refused(tmp_path / "d", shape, "adapter_config.json is missing")
    (tmp_path / "d" / "adapter_config.json").write_text("{not json")
    refused(tmp_path / "d", shape, "not valid JSON")
    (tmp_path / "d" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (tmp_path / "d" / "adapter_model.safetensors").write_bytes(b"garbage")
    refused(tmp_path / "d", shape, "not a readable safetensors")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-lead", "x" * 129, "sp ace"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidAdapter, match="adapter name"):
        validate_name(name)


def test_failed_registration_leaves_nothing_behind(tiny_llama_dir, lora_dir, tmp_path):
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import Engine

    engine = Engine.from_config(
        EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32, max_lora_rank=2)
    )
    with pytest.raises(InvalidAdapter):
        engine.adapters.register("big", lora_dir)
    with pytest.raises(InvalidAdapter):
        engine.adapters.register("../evil", lora_dir)
    assert engine.adapters.infos() == []
    assert engine.registry.loads == 0


@pytest.mark.parametrize(
    "config, match",
    [
        ({"lora_alpha": 1e308}, "lora_alpha must be in"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be finite"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be finite"),
        ({"lora_alpha": "16"}, "lora_alpha must be a number, got str"),
        ({"lora_alpha": True}, "lora_alpha must be a number, got bool"),
        ({"r": "4"}, "r must be a number, got str"),
        ({"r": 4.5}, "r must be a whole number"),
        ({"r": 0}, "r must be in"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern.*finite"),
        ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern.*number"),
        ({"rank_pattern": [4]}, "rank_pattern must be an object"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"target_modules": [["q_proj"]]}, "target_modules must be a list of module names"),
    ],
)
def test_lora_config_numbers_are_checked_at_registration(lora_dir, shape, tmp_path, config,
                                                          match):
    refused(edited(lora_dir, tmp_path, config=config), shape, match)


def test_alpha_at_its_bound_loads_and_derived_scales_are_bounded(lora_dir, shape, tmp_path):
    loaded = load_adapter(edited(lora_dir, tmp_path, config={"lora_alpha": 1e6}), shape,
                          AdapterLimits())
    assert {m.scale for m in loaded.lora.modules.values()} == {1e6 / 4}
    for bad in (float("inf"), -1e7, float("nan")):
        with pytest.raises(InvalidAdapter, match="must be finite and at most"):
            config_values.scale(bad, "scale")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"scaling": float("nan")}, "scaling must be finite"),
        ({"scaling": 1e300}, "scaling must be in"),
        ({"scaling": "1.0"}, "scaling must be a number"),
        ({"reduction_factor": float("inf")}, "reduction_factor must be finite"),
        ({"reduction_factor": "16"}, "reduction_factor must be a number"),
        ({"mh_adapter": "true"}, "mh_adapter must be true or false"),
        ({"non_linearity": 3}, "non_linearity must be a string"),
        ({"architecture": ["houlsby"]}, "architecture \\['houlsby'\\] is not one of"),
    ],
)
def test_bottleneck_config_numbers_are_checked(tiny_llama_dir, shape, tmp_path, config, match):
    path = A.make_bottleneck(tiny_llama_dir, tmp_path / "bn", "houlsby")
    refused(edited(path, tmp_path, config=config), shape, match)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"num_virtual_tokens": "5"}, "num_virtual_tokens must be a number"),
        ({"num_virtual_tokens": float("nan")}, "num_virtual_tokens must be finite"),
        ({"num_layers": 1e308}, "num_layers must be in"),
        ({"token_dim": "64"}, "token_dim must be a number"),
    ],
)
def test_prefix_config_numbers_are_checked(tiny_llama_dir, shape, tmp_path, config, match):
    path = A.make_prefix_tuning(tiny_llama_dir, tmp_path / "prefix", virtual=5)
    refused(edited(path, tmp_path, config=config), shape, match)
