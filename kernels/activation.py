"""Activations of the bottleneck shrink epilogue, by name.

The Triton kernels receive the integer code as a constexpr; the reference and the CPU path use
the torch function. "gelu" is the exact (erf) form, as in AdapterHub's `nn.GELU`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACT_NONE = 0

_ACTIVATIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "relu": (1, F.relu),
    "silu": (2, F.silu),
    "gelu": (3, F.gelu),
}

ACTIVATION_NAMES: tuple[str, ...] = tuple(_ACTIVATIONS)


def activation_code(act: str | None) -> int:
    """Constexpr code for the kernels: 0 none, 1 relu, 2 silu, 3 gelu."""
    if act is None:
        return ACT_NONE
    return _lookup(act)[0]


def activation_fn(act: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Torch function for `act`, None for no activation."""
    if act is None:
        return None
    return _lookup(act)[1]


def _lookup(act: str) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
    try:
        return _ACTIVATIONS[act]
    except KeyError:
        raise ValueError(
            f"unknown activation {act!r}; expected one of {ACTIVATION_NAMES}"
        ) from None
