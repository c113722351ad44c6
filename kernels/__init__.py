"""Low-rank delta ops over tokens grouped by adapter slot (segment GEMV/GEMM).

    meta = build_segment_meta(token_slot)          # once per step, shared by every layer
    add_lowrank_delta(y, x, A, B, rank, scale, meta, slice_sizes)   # y += per-slot delta

Layouts (the engine's stacked slot buffers; S slots, R_max = storage capacity only):
    x [T, in], y [T, out_total]          activations, contiguous in the last dim
    A [n_slices, S, R_max, in]           down projections, one per output slice
    B [S, out_total, R_max]              up projections; slice i owns rows off_i..off_i+out_i
    rank [n_slices, S] int32             each slot's real rank per slice, 0 = no update there
    scale [n_slices, S] float32
    v [n_slices, T, R_max] float32       the shrink output (lora_shrink / lora_expand)
    b_down [S, R_max], b_up [S, out_total], act "relu" | "silu" | "gelu"   bottleneck adapters
    slice_sizes: tuple of out_i summing to out_total (q/k/v under GQA, gate/up)
Tokens with slot -1 are left untouched; x, y, A, B and the biases share one dtype (float32,
float16 or bfloat16). reference.py states each op as a loop.

CUDA tensors run the Triton kernels (triton_shrink.py, triton_expand.py), imported on first
use so that importing this package never defines a `@triton.jit` function on a machine without
a GPU; CPU tensors run grouped torch matmuls (cpu_lowrank.py).
"""

from .activation import ACTIVATION_NAMES
from .dispatch import add_lowrank_delta, lora_expand, lora_shrink
from .segment_meta import SegmentChunks, SegmentMeta, build_segment_meta

__all__ = [
    "ACTIVATION_NAMES",
    "SegmentChunks",
    "SegmentMeta",
    "add_lowrank_delta",
    "build_segment_meta",
    "lora_expand",
    "lora_shrink",
]
