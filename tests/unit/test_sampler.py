"""Sampling transforms against transformers' logits processors (the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from peftserve.engine.sampler import apply_repetition_penalty, filter_top_k_top_p, sample
from peftserve.engine.sampling_params import SamplingParams
from peftserve.errors import InvalidRequest


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(top_k):
    logits = torch.randn(101, generator=torch.Generator().manual_seed(top_k))
    ours = filter_top_k_top_p(logits, top_k, 1.0)
    ref = TopKLogitsWarper(top_k)(None, logits[None].clone())[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(top_p):
    logits = torch.randn(101, generator=torch.Generator().manual_seed(7)) * 3
    ours = filter_top_k_top_p(logits, 0, top_p)
    ref = TopPLogitsWarper(top_p)(None, logits[None].clone())[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert not torch.isinf(ours).all()


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(50)
    history = [3, 3, 7, 10, 49]
    ours = logits.clone()
    apply_repetition_penalty(ours, history, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[None].clone())[0]
    torch.testing.assert_close(ours, ref)


def test_greedy_rows_take_argmax_and_seeded_rows_repeat():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams()
    hot = SamplingParams(temperature=1.5, seed=11)
    runs = []
    for _ in range(2):
        gens = [None, torch.Generator().manual_seed(11), None, torch.Generator().manual_seed(12)]
        toks, _ = sample(logits, [greedy, hot, greedy, hot], [[]] * 4, gens)
        runs.append(toks)
    assert runs[0] == runs[1]
    assert runs[0][0] == int(logits[0].argmax()) and runs[0][2] == int(logits[2].argmax())


def test_seeded_sampling_draws_from_the_distribution():
    # With top_k=2, every draw must be one of the two best tokens, and both must appear.
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 8] = 5.0, 5.0
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_k=2)
    seen = {sample(logits, [p], [[]], [gen])[0][0] for _ in range(40)}
    assert seen == {3, 8}


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(2, 30)
    toks, lps = sample(logits, [SamplingParams(logprobs=True)] * 2, [[], []], [None, None])
    ref = torch.log_softmax(logits, -1)
    assert lps == pytest.approx([float(ref[0, toks[0]]), float(ref[1, toks[1]])], abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=1e38), "temperature"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(repetition_penalty=1e30), "repetition_penalty"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_bad_sampling_parameters_are_refused(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-45), dict(temperature=1e-30, top_p=0.5),
                                    dict(temperature=1.0, repetition_penalty=1e-45)])
def test_extreme_but_valid_values_sample_the_greedy_limit_without_failing(kwargs):
    logits = torch.randn(3, 50)
    logits[1, 7] = 9.0
    params = [SamplingParams(), SamplingParams(**kwargs), SamplingParams(temperature=0.7)]
    gens = [None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    history = [[], [7] if "repetition_penalty" not in kwargs else [1, 2], []]
    tokens, _ = sample(logits, params, history, gens)
    assert tokens[0] == int(logits[0].argmax())
    if "repetition_penalty" not in kwargs:
        assert tokens[1] == 7
    assert 0 <= tokens[2] < 50
