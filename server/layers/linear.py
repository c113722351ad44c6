"""The base model's linear layers, with a seam for per-token adapter deltas.

A fused projection (q/k/v, or gate/up) is one matmul; its `slice_sizes` name the output slices
so that an adapter hook can add a different low-rank update to each slice in one call.
On the CPU in half precision the weight is held packed in oneDNN's layout
(kernels/packed_linear.py: the same results as F.linear, without a reorder on every call), and
in bf16 with the C++ kernels also in the streaming layout of the matrix-vector kernel
(kernels/gemv.py), which serves steps of up to the backend's `gemv_max_rows` rows. With
int8/int4 base weights (kernels/quant.py) that layout holds the quantized weight and serves
every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from peftserve.kernels import gemv, packed_linear, quant

# Item codes of a DecodePlan's spec (kernels/csrc/decode_forward_cpu.cpp reads the same
# numbers; it reads activations by kernels.activation.activation_code, as the Triton kernels do).
LORA_ROWS, BOTTLENECK_ROWS = 2, 3


@dataclass
class DecodePlan:
    """A step's adapter deltas as the backend's one-call decode stack takes them
    (kernels/csrc/decode_forward_cpu.cpp): the calls of the token-by-token C++ ops
    (lowrank_rows_cpu.cpp) that the hook's apply() makes, in the same order.
    For each (layer, projection) in adapters.slots.GROUPS order, `spec` holds the number of
    items, then per item its code and:
      LORA_ROWS        n_segments, n_slices, the n_slices + 1 slice offsets, then per segment
                       (row0, row1) and its n_slices ranks; tensors: A, B_blocks per segment
      BOTTLENECK_ROWS  n_segments, act code, then (row0, row1) per segment;
                       tensors: A, b_down, B_t, b_up per segment; scales: one per segment
    Rows are positions in `sorted_tokens` order (0..T-1 when `in_order`)."""

    sorted_tokens: torch.Tensor  # [T] int64
    in_order: bool
    tensors: list[torch.Tensor] = field(default_factory=list)
    spec: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)


class DeltaHook(Protocol):
    """Adds per-token adapter deltas to a linear layer's output in place."""

    def begin(self, layer: int, module: str, x: torch.Tensor) -> None:
        """A linear layer's input, before its base matmul: a hook may start the part of its
        deltas that reads x alone (TokenSlotHook: a LoRA's shrink, on a second stream)."""
        ...

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [T, in], y: [T, out] (the base output, updated in place)
        ...

    def decode_plan(self, layers: int) -> DecodePlan | None:
        """The step's deltas for the one-call decode stack, or None when apply() must run
        them layer by layer."""
        ...


class AdaptableLinear(nn.Module):
    def __init__(
        self,
        layer: int,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        slice_sizes: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.name = name  # module kind used by adapters: "qkv", "o", "gate_up", "down"
        self.out_features, self.in_features = weight.shape
        self.weight: nn.Parameter | None = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout, once pack()ed
        # kernels/gemv.py's [out, ceil(in/2), 2] bf16, or kernels/quant.py's int8/int4
        self.gemv: torch.Tensor | None = None
        self.gemv_max_rows = 0  # steps of up to this many rows read self.gemv
        self.slice_sizes = slice_sizes or (weight.shape[0],)

    def pack(self, onednn: bool = True, gemv_max_rows: int = 0, weights: str = "bf16") -> None:
        """Holds the weight packed instead of dense: for oneDNN (kernels/packed_linear.py)
        and/or, with `gemv_max_rows` > 0, for the matrix-vector kernel (kernels/gemv.py, or
        kernels/quant.py's int8/int4 `weights`), which then serves every step of up to that
        many rows (all of them without oneDNN)."""
        assert self.weight is not None and (onednn or gemv_max_rows > 0)
        if onednn:
            self.packed = packed_linear.pack(self.weight.data)
        if gemv_max_rows > 0:
            self.gemv = quant.pack(self.weight.data, weights)
            self.gemv_max_rows = gemv_max_rows
        self.weight = None

    def matmul_weight(self, rows: int = 1) -> torch.Tensor:
        """The tensor a matmul of `rows` rows reads: the matrix-vector kernel's weight, the
        oneDNN-packed one or the dense one."""
        if self.gemv is not None and (rows <= self.gemv_max_rows or self.packed is None):
            return self.gemv
        return self.packed if self.packed is not None else self.weight  # type: ignore[return-value]

    def dense_weight(self) -> torch.Tensor:
        # [out, in]
        if self.gemv is not None and self.gemv.dtype != torch.bfloat16:  # int8/int4
            return quant.dequantize(self.gemv, self.in_features).to(torch.bfloat16)
        if self.gemv is not None:
            return gemv.unpack(self.gemv, self.in_features)
        return self.packed.to_dense() if self.packed is not None else self.weight  # type: ignore[union-attr,return-value]

    def forward(self, x: torch.Tensor, hook: DeltaHook | None = None) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if hook is not None:
            hook.begin(self.layer, self.name, x)
        w = self.matmul_weight(x.shape[0])
        if w is self.gemv:
            y = quant.linear(x, w, self.bias)
        elif w is self.packed:
            y = packed_linear.linear(x, w, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if hook is not None:
            hook.apply(self.layer, self.name, x, y)
        return y
