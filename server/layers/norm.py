"""RMSNorm, computed in fp32 as transformers' Llama does. In half precision on the CPU one C++
op does it (kernels/csrc/fused_cpu.cpp, the same roundings: bf16 results are bit-equal); fp32,
the parity dtype, keeps transformers' own op sequence."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftserve.kernels import cpu_ext


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        if x.dtype != torch.float32 and not x.is_cuda and x.is_contiguous() and cpu_ext.load():
            out = torch.empty_like(x)
            torch.ops.peftserve_cpu.rms_norm(out, x, self.weight, self.eps)
            return out
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
