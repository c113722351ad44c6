"""The device sampler (engine/device_sampler.py) against the host sampler and transformers'
logits processors: the same transforms, draws that follow the filtered distribution, and a
row's draw that depends on its own (seed, counter) only."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from peftserve.engine.device_sampler import (
    SamplingColumns,
    apply_penalty,
    request_seed,
    sample_on_device,
    uniform,
)
from peftserve.engine.sampler import apply_repetition_penalty


def columns(B: int, temperature=0.0, top_k=0, top_p=1.0, penalty=1.0, seed=0, counter=0):
    def col(v, dtype):
        return torch.as_tensor(v if isinstance(v, list) else [v] * B, dtype=dtype)

    return SamplingColumns(
        temperature=col(temperature, torch.float32), top_k=col(top_k, torch.int64),
        top_p=col(top_p, torch.float32), penalty=col(penalty, torch.float32),
        seed=col(seed, torch.int64), counter=col(counter, torch.int64),
    )  # fmt: skip


def test_uniform_is_in_the_open_interval_repeatable_and_flat():
    n = 20000
    seed = torch.full((n,), 1234, dtype=torch.int64)
    u = uniform(seed, torch.arange(n))
    assert torch.equal(u, uniform(seed, torch.arange(n)))
    assert float(u.min()) > 0 and float(u.max()) < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - n / 10).abs().max() < 5 * (n / 10) ** 0.5  # ~5 sigma
    other = uniform(seed + 1, torch.arange(n))
    assert (u == other).float().mean() < 0.01  # another seed, another stream


def test_large_and_negative_seeds_are_usable():
    s = request_seed(-5, 0, 0)
    assert 0 <= s < 2**63
    u = uniform(torch.tensor([s, 2**62 + 7]), torch.tensor([0, 2**40]))
    assert bool(((u > 0) & (u < 1)).all())
    assert request_seed(None, 0, 1) != request_seed(None, 0, 2)


def test_greedy_rows_are_the_argmax_and_logprobs_the_raw_log_softmax():
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(0)) * 3
    token, logprob = sample_on_device(logits, columns(5), None, sampled_rows=False)
    assert torch.equal(token, logits.argmax(-1))
    want = torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
    assert torch.equal(logprob, want)


def test_penalty_matches_the_host_sampler():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    history = [[3, 3, 7, 10, 49], [0, 1]]
    seen = torch.zeros(2, 50, dtype=torch.bool)
    for i, h in enumerate(history):
        seen[i, h] = True
    ours = apply_penalty(logits, seen, torch.tensor([1.3, 0.7]))
    for i, p in enumerate((1.3, 0.7)):
        want = logits[i].clone()
        apply_repetition_penalty(want, history[i], p)
        torch.testing.assert_close(ours[i], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("top_k", "top_p"), [(1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8)])
def test_draws_stay_in_the_filtered_support(top_k, top_p):
    logits = torch.randn(1, 101, generator=torch.Generator().manual_seed(7)) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    allowed = set(torch.nonzero(torch.isfinite(ref[0])).flatten().tolist())
    n = 400
    cols = columns(n, temperature=1.0, top_k=top_k, top_p=top_p, seed=3, counter=list(range(n)))
    token, _ = sample_on_device(logits.expand(n, -1), cols, None, sampled_rows=True)
    drawn = set(token.tolist())
    assert drawn <= allowed
    if len(allowed) <= 5:
        assert drawn == allowed


def test_draw_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n, t = 20000, 0.8
    cols = columns(n, temperature=t, seed=11, counter=list(range(n)))
    token, _ = sample_on_device(logits.expand(n, -1), cols, None, sampled_rows=True)
    freq = torch.bincount(token, minlength=5).float() / n
    probs = (logits[0] / t).softmax(-1)
    assert (freq - probs).abs().max() < 0.015


def test_a_rows_draw_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 300, generator=g)
    cols = columns(8, temperature=[0.0, 1.0, 0.7, 1.3, 0.0, 1.0, 2.0, 0.5],
                   top_k=[0, 0, 10, 0, 0, 50, 0, 3], top_p=[1.0, 0.9, 1.0, 0.5, 1, 1, 0.95, 1],
                   seed=list(range(100, 108)), counter=[9] * 8)  # fmt: skip
    together, _ = sample_on_device(logits, cols, None, sampled_rows=True)
    for i in range(8):
        one = SamplingColumns(*(getattr(cols, f)[i : i + 1] for f in cols.__dataclass_fields__))
        alone, _ = sample_on_device(logits[i : i + 1], one, None, sampled_rows=True)
        assert int(alone) == int(together[i])
    assert torch.equal(together[[0, 4]], logits[[0, 4]].argmax(-1))


def test_a_row_without_a_finite_distribution_answers_its_argmax():
    logits = torch.zeros(2, 10)
    logits[0] = float("nan")
    logits[1, 4] = 1.0
    token, _ = sample_on_device(logits, columns(2, temperature=1.0, seed=1), None, True)
    assert int(token[0]) == int(logits[0].argmax())
    assert 0 <= int(token[1]) < 10
