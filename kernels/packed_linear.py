"""Base weights packed once in oneDNN's blocked layout, for half-precision matmuls on the CPU.

    if packed_linear.supported(torch.bfloat16):
        wp = packed_linear.pack(w)             # [out, in] -> opaque oneDNN tensor, same values
        y = packed_linear.linear(x, wp, bias)  # == F.linear(x, w, bias), bit for bit

A bf16 `F.linear` on the CPU goes to oneDNN, which reorders the whole weight into its blocked
layout on every call: at decode batch sizes that reorder costs as much as the matmul (SmolLM2,
2 threads, all layers + LM head: 46 ms plain vs 33 ms packed at batch 32, 31 vs 21 ms at batch
1). Packing once at load removes it; the kernel that runs is the same, so the results equal
F.linear's at every batch size (tested). This is the prepack PyTorch's own
Inductor applies to frozen CPU linears (torch.ops.mkldnn._reorder_linear_weight /
_linear_pointwise).

Half precision only: fp32 goes to MKL, whose packed form (torch.ops.mkl._mkl_linear) was not
faster here and is not bit-equal to F.linear, which the fp32 parity tests rest on. fp16 needs a
CPU with AVX512-FP16 or AVX-NE-CONVERT. The CPU backend packs unless `PEFTSERVE_PACKED_WEIGHTS=0`
(layers/backend.py reads it).
"""

from __future__ import annotations

import torch

ENV_SWITCH = "PEFTSERVE_PACKED_WEIGHTS"
_BATCH_HINT = 32  # oneDNN's layout choice; measured the same for hints 1, 32 and 512


def supported(dtype: torch.dtype) -> bool:
    """True when this CPU's oneDNN multiplies `dtype` from packed weights (bf16/fp16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    # weight: [out, in] -> the same matrix in oneDNN's layout (an opaque mkldnn tensor;
    # .to_dense() gives the original back)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [..., in] -> [..., out]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
