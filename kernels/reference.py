"""Naive torch reference: the python loops below are the specification of the ops.

Independent of any tiling or grouping: it walks tokens one by one, reads the slot straight from
`token_slot` (not from `SegmentMeta`) and computes in float64. Slow; for tests and benchmarks.
"""

from __future__ import annotations

import torch

from .activation import activation_fn


def shrink_reference(
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    rank: torch.Tensor,  # [n_slices, S] int
    token_slot: torch.Tensor,  # [T] int, -1 = no adapter
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max]
    act: str | None = None,
) -> torch.Tensor:  # v: [n_slices, T, R_max] float32
    """Return v, defined by:

    ```python
    v = zeros(n_slices, T, R_max)
    for i in range(n_slices):
        for t in range(T):
            s = token_slot[t]
            if s < 0 or rank[i, s] == 0:
                continue
            r = rank[i, s]
            h = A[i, s, :r] @ x[t]
            if b_down is not None:
                h = h + b_down[s, :r]
            if act is not None:
                h = act(h)
            v[i, t, :r] = h
    ```
    """
    fn = activation_fn(act)
    n_slices, _, r_max, _ = A.shape
    v = torch.zeros(n_slices, x.shape[0], r_max, dtype=torch.float64)
    for i in range(n_slices):
        for t in range(x.shape[0]):
            s = int(token_slot[t])
            if s < 0 or int(rank[i, s]) == 0:
                continue
            r = int(rank[i, s])
            h = A[i, s, :r].double() @ x[t].double()
            if b_down is not None:
                h = h + b_down[s, :r].double()
            if fn is not None:
                h = fn(h)
            v[i, t, :r] = h
    return v.float()


def expand_reference(
    y: torch.Tensor,  # [T, out_total]
    v: torch.Tensor,  # [n_slices, T, R_max]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int
    scale: torch.Tensor,  # [n_slices, S] float
    token_slot: torch.Tensor,  # [T] int, -1 = no adapter
    slice_sizes: tuple[int, ...],  # out_i per slice, summing to out_total
    *,
    b_up: torch.Tensor | None = None,  # [S, out_total]
) -> torch.Tensor:  # new y: [T, out_total], y.dtype; the input is not modified
    """Return y after the update defined by:

    ```python
    off = 0
    for i, out in enumerate(slice_sizes):
        for t in range(T):
            s = token_slot[t]
            if s >= 0 and rank[i, s] > 0:
                r = rank[i, s]
                d = B[s, off:off + out, :r] @ v[i, t, :r]
                if b_up is not None:
                    d = d + b_up[s, off:off + out]
                y[t, off:off + out] += scale[i, s] * d
        off += out
    ```
    """
    acc = y.double().clone()
    off = 0
    for i, out in enumerate(slice_sizes):
        for t in range(y.shape[0]):
            s = int(token_slot[t])
            if s < 0 or int(rank[i, s]) == 0:
                continue
            r = int(rank[i, s])
            d = B[s, off : off + out, :r].double() @ v[i, t, :r].double()
            if b_up is not None:
                d = d + b_up[s, off : off + out].double()
            acc[t, off : off + out] += float(scale[i, s]) * d
        off += out
    return acc.to(y.dtype)


def lowrank_delta_reference(
    y: torch.Tensor,  # [T, out_total]
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int
    scale: torch.Tensor,  # [n_slices, S] float
    token_slot: torch.Tensor,  # [T] int, -1 = no adapter
    slice_sizes: tuple[int, ...],
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max]
    b_up: torch.Tensor | None = None,  # [S, out_total]
    act: str | None = None,
) -> torch.Tensor:  # new y: [T, out_total]
    """`expand_reference` applied to `shrink_reference`, with v kept in float64.

    For plain LoRA this is the design's loop (DESIGN.md, Kernels):

    ```
    for t in tokens:  s = slot[t]; if s < 0: continue
        y[t] += scale[s] * B[s][:, :rank[s]] @ (A[s][:rank[s]] @ x[t])
    ```
    """
    fn = activation_fn(act)
    acc = y.double().clone()
    off = 0
    for i, out in enumerate(slice_sizes):
        for t in range(y.shape[0]):
            s = int(token_slot[t])
            if s < 0 or int(rank[i, s]) == 0:
                continue
            r = int(rank[i, s])
            h = A[i, s, :r].double() @ x[t].double()
            if b_down is not None:
                h = h + b_down[s, :r].double()
            if fn is not None:
                h = fn(h)
            d = B[s, off : off + out, :r].double() @ h
            if b_up is not None:
                d = d + b_up[s, off : off + out].double()
            acc[t, off : off + out] += float(scale[i, s]) * d
        off += out
    return acc.to(y.dtype)
