"""Rotary cos/sin looked up from the table (layers/rotary.py) against transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from peftserve.layers.rotary import RotaryEmbedding

HEAD_DIM = 48
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
    },  # fmt: skip
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 256},  # fmt: skip
}


def config(rope: str, max_positions: int = 2048) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=max_positions,
        rope_parameters=dict(ROPES[rope]),
    )  # fmt: skip


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_matches_transformers(rope: str, dtype: torch.dtype) -> None:
    cfg = config(rope)
    ours = RotaryEmbedding(cfg, HEAD_DIM, torch.device("cpu"), cfg.max_position_embeddings)
    positions = torch.tensor([0, 1, 7, 255, 256, 1000, 2047, 3])  # unsorted, past the original
    cos, sin = ours.cos_sin(positions, dtype)
    assert cos.shape == sin.shape == (len(positions), 1, HEAD_DIM) and cos.dtype == dtype
    ref = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=dtype)
    ref_cos, ref_sin = ref(x, positions[None, :])  # [1, T, head_dim]
    torch.testing.assert_close(cos[:, 0], ref_cos[0])
    torch.testing.assert_close(sin[:, 0], ref_sin[0])


def test_a_position_reads_the_same_values_in_any_step() -> None:
    # A step's positions are looked up, not computed together: whatever else a step holds
    # (a long prefill chunk, other sequences), position p gets the same bits.
    cfg = config("default")
    rotary = RotaryEmbedding(cfg, HEAD_DIM, torch.device("cpu"), cfg.max_position_embeddings)
    many = torch.randint(0, 2048, (1500,))
    cos_all, sin_all = rotary.cos_sin(many, torch.float32)
    for i in (0, 511, 1023, 1499):
        cos, sin = rotary.cos_sin(many[i : i + 1], torch.float32)
        assert torch.equal(cos[0], cos_all[i]) and torch.equal(sin[0], sin_all[i])


def test_build_sizes_the_table_and_refuses_positions_past_it() -> None:
    cfg = config("default", max_positions=1 << 20)
    rotary = RotaryEmbedding(cfg, HEAD_DIM, torch.device("cpu"), cfg.max_position_embeddings)
    rotary.build(300, torch.bfloat16)  # the engine's context length, not the model's million
    cos, _ = rotary._table(torch.bfloat16)
    assert cos.shape[0] == 300
    rotary.cos_sin(torch.tensor([299]), torch.bfloat16)
    with pytest.raises(IndexError):
        rotary.cos_sin(torch.tensor([300]), torch.bfloat16)
    # another dtype gets its own table of the same length
    assert rotary._table(torch.float32)[0].shape[0] == 300
