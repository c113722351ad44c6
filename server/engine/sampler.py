"""Turns the last-position logits of a step into one token per sequence, each with its own
sampling parameters (greedy rows never touch a random generator)."""

from __future__ import annotations

import torch

from peftserve.engine.sampling_params import SamplingParams
from peftserve.layers.backend import REFERENCE, Backend


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    # logits: [V] fp32, updated in place as transformers' RepetitionPenaltyLogitsProcessor does.
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    scores = logits[ids]
    logits[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits: [V] (already divided by the temperature) -> [V] with removed entries at -inf
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        remove = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    generators: list[torch.Generator | None],
    backend: Backend = REFERENCE,
) -> tuple[list[int], list[float] | None]:
    """logits: [B, V] fp32. Returns B tokens, and their logprobs under the unprocessed
    distribution when any row asked for them."""
    raw = logits
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(logits[i], histories[i], p.repetition_penalty)
    tokens = backend.argmax_rows(logits)  # greedy rows' answers (the CPU's C++ op: ~10x torch's)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        # Shifted so that the largest logit is 0 before dividing: a tiny temperature sends the
        # others to -inf (the greedy limit) rather than the largest to +inf (NaN after softmax).
        row = logits[i] - logits[i].max()
        row = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        if not torch.isfinite(probs).all():
            # Only logits already non-finite get here (a repetition penalty near 0 overflows
            # them): the distribution's limit is its argmax, and no other request is disturbed.
            continue
        # Sampled on the CPU so a request seed gives the same tokens on every device.
        tokens[i] = int(torch.multinomial(probs.cpu(), 1, generator=generators[i]).item())
    logprobs = None
    if any(p.logprobs for p in params):
        lp = torch.log_softmax(raw, dim=-1)
        idx = torch.tensor(tokens, dtype=torch.long, device=raw.device)
        logprobs = lp.gather(1, idx[:, None]).squeeze(1).tolist()
    return tokens, logprobs
