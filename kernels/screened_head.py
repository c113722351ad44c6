"""Greedy tokens from a bf16 LM head without reading all of it, bit for bit the full head's.

    head = ScreenedHead(packed, weight)   # packed: gemv.pack(weight); weight [V, hidden] bf16
    tokens = head.argmax(h)               # h [M, hidden] bf16 -> [M] int64, or None

A one-row decode step reads every weight once, and SmolLM2's LM head is a fifth of its bytes.
A greedy row needs only the head's argmax, so an int8 copy of the head (per-row scales, half
the bytes) screens the vocabulary: with a rigorous bound B[n] on |int8 logit - bf16 logit|,
only the rows whose int8 logit reaches the best one's floor (a[n] + B[n] >= max_m a[m] - B[m])
can be the argmax, and their tiles (6.1 of SmolLM2's 1536 on average over 384 greedy steps
of the bench's chat requests, 52 at most) are computed again by the bf16 kernel: the same sums
on the same tiles as the full head (gemv.py: a row's result never depends on the other rows of
the call). The token is then the one argmax_rows picks from the full head's logits, ties to the
lowest index included (every row tied with the best is a candidate). csrc/screened_head_cpu.cpp
does it in one op; the engine takes it for steps of up to MAX_ROWS rows that are all plain
greedy (no temperature, logprobs or repetition penalty: model_runner.py), the full head
otherwise.

The bound, for row n of W (bf16), its int8 form Wq = s[n] q[n] (kernels/quant.py) and x:
- the weights' rounding: |x . (W[n] - Wq[n])| <= |x|_2 |W[n] - Wq[n]|_2 (Cauchy-Schwarz; the
  norms computed once, in float64);
- both kernels' roundings: x rounded to int16 per block of X_BLOCK columns (the AVX2 code:
  within 2^-15 of each block's largest magnitude, so |x - x~|_2 <= 2^-15 sqrt(X_BLOCK) |x|_2)
  and fp32 sums of K products (within K 2^-24 of sum |x||w|, <= K 2^-24 |x|_2 |W[n]|_2, in any
  order): twice their sum, times |x|_2 |W[n]|_2; together coef[n] |x|_2;
- the two logits' roundings to bf16 (2^-8 of each) and slack: B = (1 + 2^-6) coef[n] |x|_2
  + 2^-6 |a[n]| + tiny (subnormal x read as zero, subnormal logits).
The op declines (None: the caller takes the full head) where |x|_2 max|W[n]|_2 could overflow
an fp32 sum or a logit it reads is not finite.
"""

from __future__ import annotations

import math

import torch

from peftserve.kernels import quant

ROWS_AT_ONCE = 4096  # rows of the head in float64 at a time while building
# Rows of x up to which the screen serves. SmolLM2's head, real final hidden states, caches
# flushed before each call, 12 interleaved calls each (AVX2-only Zen 3, 2 threads): the
# screen's time over the full head's 0.61 / 0.71 / 0.86 / 0.89 / 0.99 / 1.07 at 1 / 2 / 4 / 8 /
# 16 / 32 rows (the candidates of every row are computed for all rows, and beyond a few rows
# both kernels are compute-bound there).
MAX_ROWS = 8


class ScreenedHead:
    def __init__(self, packed: torch.Tensor, weight: torch.Tensor) -> None:
        # packed: [V, ceil(K/2), 2] bf16 (gemv.pack(weight)); weight: [V, K] bf16
        V, K = weight.shape
        q, s = quant.quantize_int8(weight)
        self.screen = quant.pack_int8(q, s)  # [V, 2 ceil(K/2) + 4] int8
        err, norm = torch.empty(V, dtype=torch.float64), torch.empty(V, dtype=torch.float64)
        for n0 in range(0, V, ROWS_AT_ONCE):  # float64 a piece at a time
            w = weight[n0 : n0 + ROWS_AT_ONCE].double()
            wq = q[n0 : n0 + ROWS_AT_ONCE].double() * s[n0 : n0 + ROWS_AT_ONCE, None].double()
            err[n0 : n0 + ROWS_AT_ONCE] = (w - wq).norm(dim=1)
            norm[n0 : n0 + ROWS_AT_ONCE] = w.norm(dim=1)
        rounding = 2 * (2**-15 * math.sqrt(quant.X_BLOCK) + 2 * K * 2**-24)
        # per row: the bound's |x|_2 coefficient, rounded up into fp32
        self.coef = ((err + rounding * norm) * (1 + 2**-20)).float()
        max_norm = float(norm.max())
        # weights not all finite: never screened (the op refuses every x)
        self.max_norm = max_norm if math.isfinite(max_norm) else math.inf
        # subnormal x read as zero (vdpbf16ps) and the logits' subnormal rounding
        self.tiny = 2**-118 * math.sqrt(K) * max_norm + 2**-126 if math.isfinite(max_norm) else 0.0
        self.packed = packed

    def argmax(self, h: torch.Tensor) -> torch.Tensor | None:
        """h: [M, K] bf16 -> each row's argmax of the full head's logits [M] (int64), as
        argmax_rows(gemv.linear(h, packed).float()) gives it; None: take the full head."""
        if h.shape[0] > MAX_ROWS:
            return None
        tokens = h.new_empty(h.shape[0], dtype=torch.long)
        ok = torch.ops.peftserve_cpu.screened_argmax(
            tokens, h.contiguous(), self.screen, self.coef, self.packed, self.max_norm, self.tiny
        )
        return tokens if ok else None
