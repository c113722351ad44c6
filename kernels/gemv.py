"""bf16 base weights laid out once for the C++ matrix-vector kernel (csrc/gemv_bf16_cpu.cpp).

    wp = gemv.pack(w)                      # [N, K] bf16 -> [N, ceil(K/2), 2], tile order
    y = gemv.linear(x, wp, bias)           # x [M, K] -> [M, N] bf16, fp32 accumulation
    w == gemv.unpack(wp, K)                # the dense weight back, bit for bit

At decode batch sizes a CPU matmul is a read of the weights; this kernel streams each weight
once per call, one contiguous stretch per thread, with AVX-512 BF16 dot products where the CPU
has them (the shift-and-FMA AVX2 code or plain loops otherwise, with the same roundings). The
sum behind every output is fixed (the C++ file's comment), so a row's result never depends on
how many rows the call has: batch invariant, bit for bit.

Layout: W's rows in tiles of TILE; within a tile, for each column pair kp, every row's
(W[n, 2kp], W[n, 2kp+1]) side by side; an odd K gets a zero column. The tensor has W's
element count (plus that column) as [N, ceil(K/2), 2] so its shape names N and K, but its
storage is in tile order: only unpack() reads it as a matrix.
"""

from __future__ import annotations

import sys

import torch

TILE = 32  # rows per tile; csrc/gemv_bf16_cpu.cpp's TILE

EVERY_STEP = sys.maxsize  # a row limit no step reaches

# Rows up to which a bf16 step's base matmuls take this kernel on the CPU backend; steps with
# more rows take oneDNN's packed matmul (kernels/packed_linear.py), which then holds a second
# copy of the weights. Measured by bench/cpu_gemv.py (bench/results/cpu_gemv.json, a whole
# SmolLM2-135M pass, 2 threads, medians of 7 interleaved rounds): this kernel's time over
# oneDNN's is 0.67 at 1 row, 0.77 at 8, 0.88 at 16, 0.97 at 32, then 1.09 at 64 and 128 and
# 1.16 at 256 rows (prefill chunks, where oneDNN's register blocking wins). Within a few % or
# faster up to 32 rows, so no limit: the kernel serves every bf16 step, the weights are held
# once (270 MB on SmolLM2, not 2 x 270), and prefill chunks of 64-256 rows pay 9-16%.
# On an Intel Xeon with AMX (oneDNN's bf16 matmul is AMX code there) the kernel takes AMX too
# (bench/results/cpu_gemv_xeon_amx.json): 0.74 at 1 row, 0.81 at 8, 0.86 at 32, 1.02 at 64,
# 1.12 at 128; no limit there either, and a limit would break batch invariance (a request's
# rows through oneDNN's sums in some steps and ours in others).
GEMV_MAX_ROWS = EVERY_STEP


def pack(weight: torch.Tensor) -> torch.Tensor:
    # weight: [N, K] bf16 -> [N, ceil(K/2), 2] bf16 in tile order (a new tensor)
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"gemv.pack takes a 2-D bfloat16 weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")  # fmt: skip
    N, K = weight.shape
    if K % 2:
        weight = torch.cat([weight, weight.new_zeros(N, 1)], dim=1)
    Kp = weight.shape[1] // 2
    full = N - N % TILE
    pairs = weight.reshape(N, Kp, 2)
    head = pairs[:full].reshape(full // TILE, TILE, Kp, 2).transpose(1, 2)
    tail = pairs[full:].transpose(0, 1)  # [Kp, N % TILE, 2]
    flat = torch.cat([head.reshape(-1), tail.reshape(-1)])
    return flat.view(N, Kp, 2)


def unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    # packed: [N, Kp, 2] from pack() -> [N, in_features] bf16, the weight pack() was given
    N, Kp, _ = packed.shape
    full = N - N % TILE
    flat = packed.reshape(-1)
    head = flat[: full * Kp * 2].view(full // TILE, Kp, TILE, 2).transpose(1, 2)
    tail = flat[full * Kp * 2 :].view(Kp, N % TILE, 2).transpose(0, 1)
    dense = torch.cat([head.reshape(full, 2 * Kp), tail.reshape(N - full, 2 * Kp)])
    return dense[:, :in_features].contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [..., K] bf16 -> [..., N] bf16 (the C++ op; cpu_ext.load() must have returned True)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x2.new_empty(x2.shape[0], packed.shape[0])
    torch.ops.peftserve_cpu.gemv_bf16(out, x2, packed, bias)
    return out.view(*lead, packed.shape[0])


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The op's specification in float64: y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]).
    x: [M, K], weight: [N, K] (dense) -> [M, N] float64."""
    y = x.double() @ weight.double().T
    return y + bias.double() if bias is not None else y
