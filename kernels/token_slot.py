"""The low-rank delta read by per-token slot index, in plain torch with static shapes.

No SegmentMeta, no host copy, no data-dependent shape: the form a CUDA graph can capture, whose
inputs are a token -> slot tensor that lives in a persistent buffer. Each token gathers its
slot's A and B rows (batched GEMV), so it reads T * R_max * (in + out) elements per slice: fine
for a decode step's few tokens, and the fallback where no one-launch kernel replaces it.

Semantics: reference.lowrank_delta_reference's loop, with the slot read from `token_slot`:

    for t in tokens:  s = token_slot[t]; if s < 0: continue
        for each slice i (rows off_i..off_i+out_i of y), r = rank[i, s]; if r == 0: continue
            h = act(A[i, s, :r] @ x[t] + b_down[s, :r])
            y[t, off_i:off_i+out_i] += scale[i, s] * (B[s, off_i:off_i+out_i, :r] @ h + b_up)
"""

from __future__ import annotations

import torch

from .activation import activation_fn


def lowrank_delta_token_slot(
    y: torch.Tensor,  # [T, out_total], updated in place
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32, 0 = no update on that slice
    scale: torch.Tensor,  # [n_slices, S] float32
    token_slot: torch.Tensor,  # [T] integer, -1 = no adapter
    slice_sizes: tuple[int, ...],  # out_i per slice, summing to out_total
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max]
    b_up: torch.Tensor | None = None,  # [S, out_total]
    act: str | None = None,
) -> torch.Tensor:  # y
    fn = activation_fn(act)
    live = token_slot >= 0
    s = token_slot.clamp(min=0).long()  # [T]
    steps = torch.arange(A.shape[2], device=x.device)
    off = 0
    for i, size in enumerate(slice_sizes):
        r = torch.where(live, rank[i, s], 0)  # [T]
        h = torch.bmm(A[i, s], x.unsqueeze(-1)).squeeze(-1).float()  # [T, R_max]
        if b_down is not None:
            h = h + b_down[s].float()
        if fn is not None:
            h = fn(h)
        h = h * (steps[None, :] < r[:, None])  # zero past each token's rank
        B_t = B[s, off : off + size]  # [T, out_i, R_max]
        d = torch.bmm(B_t, h.to(B.dtype).unsqueeze(-1)).squeeze(-1).float()  # [T, out_i]
        if b_up is not None:
            d = d + b_up[s, off : off + size].float()
        w = torch.where(r > 0, scale[i, s], 0.0)  # [T]: rank 0 (or no slot) adds nothing
        y[:, off : off + size] += (d * w[:, None]).to(y.dtype)
        off += size
    return y
