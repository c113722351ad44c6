"""RMSNorm, computed in fp32 as transformers' Llama does, by the engine's backend (the CPU
backend's C++ op in half precision has the same roundings: bf16 results are bit-equal)."""

from __future__ import annotations

import torch
from torch import nn

from peftserve.layers.backend import Backend


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, backend: Backend) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        return self.backend.rms_norm(x, self.weight, self.eps)

    def add(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm), the add fused into the norm where the backend can (one
        launch on the Triton backend); residual None: (x, the norm of x)."""
        if residual is None:
            return x, self(x)
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)
