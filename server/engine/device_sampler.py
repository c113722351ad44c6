"""Sampling on the device, with static shapes and no host synchronization: the form a CUDA graph
can capture. One token per row with the row's own parameters (greedy, temperature, top-k, top-p,
repetition penalty) and its own random stream.

A per-request torch.Generator cannot live inside a graph, so each row's random number is a hash
of (seed, counter), where the counter is the index the sampled token will take in its sequence:
a request's draws depend on its seed and its own progress only, never on the batch around it.
The draw is inverse-CDF sampling over the filtered distribution in sorted order (one uniform per
row, not one per vocabulary entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # mixes seed 0 away from the all-zero state


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for int64 h in [0, 2**32), in halves so no product leaves int64's range.
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's finalizer: int64 tensor of 32-bit values -> well-mixed 32-bit values
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """seed, counter: [B] int64 -> [B] float32, uniform in (0, 1) (never 0 or 1 exactly)."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    h = _fmix32(lo ^ _GOLDEN)
    h = _fmix32(h ^ hi)
    h = _fmix32(h ^ (counter & _MASK32))
    # 23 bits, centred in their interval: the largest value is 1 - 2**-24, exact in fp32.
    return (h >> 9).float() * 2.0**-23 + 2.0**-24


@dataclass(frozen=True)
class SamplingColumns:
    """Each row's sampling parameters, as device tensors of one step ([B] each)."""

    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32, 1 = off
    penalty: torch.Tensor  # float32 repetition penalty, 1 = off
    seed: torch.Tensor  # int64
    counter: torch.Tensor  # int64, index of the token being sampled in its sequence


def apply_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] fp32; seen: [B, V] bool, the tokens of each row's history; penalty: [B].
    -> new logits, penalized as transformers' RepetitionPenaltyLogitsProcessor does."""
    p = penalty[:, None]
    hit = seen & (p != 1.0)
    return torch.where(hit, torch.where(logits < 0, logits * p, logits / p), logits)


def draw(logits: torch.Tensor, cols: SamplingColumns) -> torch.Tensor:
    """logits: [B, V] fp32 (penalized) -> [B] int64, a draw for every row from its tempered,
    top-k / top-p filtered distribution (rows that are greedy are drawn too; the caller picks).
    A row whose distribution is not finite answers its argmax."""
    V = logits.shape[-1]
    t = torch.where(cols.temperature > 0, cols.temperature, 1.0)[:, None]
    # Shifted so the largest logit is 0 before dividing (the sampler's guard against overflow).
    x = (logits - logits.max(-1, keepdim=True).values) / t
    sx, order = torch.sort(x, dim=-1, descending=True, stable=True)
    k = torch.where((cols.top_k > 0) & (cols.top_k < V), cols.top_k, V)
    kth = sx.gather(1, (k - 1)[:, None])
    sx = sx.masked_fill(sx < kth, float("-inf"))  # ties with the k-th stay, as in topk
    p = sx.softmax(-1)
    top_p = cols.top_p[:, None]
    # The smallest prefix whose mass reaches top_p (always at least the top token).
    remove = (p.cumsum(-1) - p >= top_p) & (top_p < 1.0)
    probs = sx.masked_fill(remove, float("-inf")).softmax(-1)
    cdf = probs.cumsum(-1)
    target = uniform(cols.seed, cols.counter)[:, None] * cdf[:, -1:]
    choice = (cdf < target).sum(-1).clamp_(max=V - 1)
    token = order.gather(1, choice[:, None]).squeeze(1)
    finite = torch.isfinite(probs).all(-1)
    return torch.where(finite, token, logits.argmax(-1))


def sample_on_device(
    logits: torch.Tensor, cols: SamplingColumns, seen: torch.Tensor | None, sampled_rows: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [B, V] fp32; seen: [B, V] bool history mask, or None when no row has a
    repetition penalty; sampled_rows: False when every row is greedy (the sort is skipped).
    -> tokens [B] int64 and their logprobs [B] fp32 under the unprocessed distribution."""
    raw = logits
    if seen is not None:
        logits = apply_penalty(logits, seen, cols.penalty)
    token = logits.argmax(-1)
    if sampled_rows:
        token = torch.where(cols.temperature > 0, draw(logits, cols), token)
    logprob = torch.log_softmax(raw, -1).gather(1, token[:, None]).squeeze(1)
    return token, logprob


def request_seed(seed: int | None, engine_seed: int, seq_id: int) -> int:
    """The seed of a request's stream: its own, or (without one) one derived from the engine's
    seed and the sequence id, so a run of the engine repeats itself."""
    if seed is not None:
        return seed & ((1 << 63) - 1)
    return (engine_seed * 0x9E3779B97F4A7C15 + seq_id * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
