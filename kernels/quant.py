"""Weight-only int8 and int4 base weights for the C++ CPU kernels (csrc/gemv_quant_cpu.cpp).

    wq = quant.pack(w, "int8")             # [N, K] bf16 -> int8 [N, 2 ceil(K/2) + 4]
    wq = quant.pack(w, "int4")             # -> uint8 [N, ceil(K/32), 24] (group GROUP)
    y = quant.linear(x, wq, bias)          # x [M, K] bf16 -> [M, N] bf16 (bf16 layouts too)
    w_hat = quant.dequantize(wq, K)        # [N, K] float64: the weights the kernel multiplies

Quantized once at load, from the bf16 weights:
- int8: per output channel, symmetric absmax: s = max|W[n]| / 127, q = round(W / s).
- int4: per row and group of GROUP columns, asymmetric min/max: d = (max - min) / 15,
  u = round((W - min) / d) in 0..15, stored as d and c = min - 128 d (fp32) so that the kernel
  multiplies the exact bf16 128 + u (csrc/gemv_quant_cpu.cpp's comment); the weight is
  d * (128 + u) + c. 4 bits + 64 bits per 32 weights: 6 bits a weight (Q4_1 in llama.cpp: 5).
Activations and results stay bf16; the sums are fp32. Where the CPU has AVX2 but not AVX-512
BF16 the kernel multiplies integers: each row of x is rounded to int16 in blocks (X_BLOCK
columns for int8, the group for int4), a power-of-two scale each, exact for every value within
2^7 of its block's largest magnitude and within 2^-15 of that magnitude for the rest; the
blocks' integer sums are exact. (vdpbf16ps, the AVX-512 code's, reads subnormal x as zero.)
The tensors' storage is in the kernel's tile order (16 rows a tile, the scales inside each
tile's stretch); only dequantize() reads them as matrices. The kernel serves every row count:
decode steps read the int8/int4 bytes directly, and larger steps (prefill chunks) reuse each
tile's bytes, in cache, for every 8 rows.
"""

from __future__ import annotations

import torch

from peftserve.kernels import gemv

WEIGHTS = ("bf16", "int8", "int4")
TILE = 16  # rows per tile; csrc/gemv_quant_cpu.cpp's TILE
GROUP = 32  # int4 columns per scale and offset (the kernel takes 32, 64 or 128)
# The LM head's form for each base weight kind (models/llama.py; bench/quant_accuracy.py measured
# the choice)
LM_HEAD = {"bf16": "bf16", "int8": "int8", "int4": "int8"}
X_BLOCK = 32  # int8: columns of x per int16 scale in the AVX2 code (int4: the group)
INT4_OFFSET = 128.0  # the kernel multiplies 128 + u, a bf16 with u in its mantissa


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # weight: [N, K] -> q int8 [N, K], scale fp32 [N] (W ~ scale[:, None] * q)
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    weight: torch.Tensor, group: int = GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # weight: [N, K] -> u uint8 [N, G * group] (0..15, zero-padded), d and c fp32 [N, G]
    # (W ~ d * (128 + u) + c, group by group)
    N, K = weight.shape
    G = -(-K // group)
    w = weight.float()
    if G * group > K:  # padded columns copy the row's first ones: the range is unchanged
        w = torch.cat([w, w[:, :1].expand(N, G * group - K)], dim=1)
    w = w.view(N, G, group)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    d = (hi - lo) / 15.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    u = torch.round((w - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    u = u.view(N, G * group)
    u[:, K:] = 0
    return u, d, lo - INT4_OFFSET * d


def _tiles(per_row: torch.Tensor, build) -> torch.Tensor:
    """Rows in tiles of TILE (the last one narrower), each tile's bytes from build(rows)."""
    N = per_row.shape[0]
    parts = [build(slice(n0, min(N, n0 + TILE))).reshape(-1) for n0 in range(0, N, TILE)]
    return torch.cat(parts) if parts else per_row.new_empty(0, dtype=torch.uint8)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # t: [..., n] -> uint8 [..., n * element size], in t's logical order
    size = t.element_size()
    return t.reshape(-1).contiguous().view(torch.uint8).view(*t.shape[:-1], t.shape[-1] * size)


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # q: int8 [N, K], scale: fp32 [N] -> int8 [N, 2 ceil(K/2) + 4] in tile order
    N, K = q.shape
    if K % 2:
        q = torch.cat([q, q.new_zeros(N, 1)], dim=1)
    Kp = q.shape[1] // 2
    pairs = q.view(N, Kp, 2)

    def tile(rows: slice) -> torch.Tensor:
        data = pairs[rows].transpose(0, 1)  # [Kp, w, 2]
        return torch.cat([_bytes(scale[rows].float()), _bytes(data).reshape(-1)])

    return _tiles(q, tile).view(torch.int8).view(N, 2 * Kp + 4)


def pack_int4(u: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # u: uint8 [N, G * group] (0..15), d, c: fp32 [N, G] -> uint8 [N, G, group/2 + 8]
    N, G = d.shape
    group = u.shape[1] // G
    u4 = u.view(N, G, group // 4, 4)
    chunks = torch.stack([u4[..., 0] | (u4[..., 2] << 4), u4[..., 1] | (u4[..., 3] << 4)], -1)

    def tile(rows: slice) -> torch.Tensor:
        data = _bytes(chunks[rows].permute(1, 2, 0, 3))  # [G, group/4, w, 2]
        dd, cc = _bytes(d[rows].T), _bytes(c[rows].T)  # [G, 4w]
        return torch.cat([dd, cc, data.reshape(G, -1)], dim=1)

    return _tiles(u, tile).view(N, G, group // 2 + 8)


def pack(weight: torch.Tensor, weights: str) -> torch.Tensor:
    """The weight [N, K] bf16 in the kernel's layout for `weights` (one of WEIGHTS)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"quant.pack takes a 2-D bfloat16 weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if weights == "int8":
        return pack_int8(*quantize_int8(weight))
    if weights == "int4":
        return pack_int4(*quantize_int4(weight))
    if weights == "bf16":
        return gemv.pack(weight)
    raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")


def _untile(flat: torch.Tensor, N: int, row_bytes: int, split) -> list[torch.Tensor]:
    """Each tile's pieces from split(tile_bytes, width), in tile order."""
    out = []
    for n0 in range(0, N, TILE):
        w = min(N, n0 + TILE) - n0
        out.append(split(flat[n0 * row_bytes : (n0 + w) * row_bytes], w))
    return out


def dequantize(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The weights the kernel multiplies, [N, in_features] float64 (bf16 layouts: exact)."""
    if packed.dtype == torch.bfloat16:
        return gemv.unpack(packed, in_features).double()
    N = packed.shape[0]
    flat = packed.reshape(-1).view(torch.uint8)
    if packed.dtype == torch.int8:
        Kp = (packed.shape[1] - 4) // 2

        def split8(t: torch.Tensor, w: int) -> torch.Tensor:
            s = t[: 4 * w].view(torch.float32).double()
            q = t[4 * w :].view(torch.int8).view(Kp, w, 2).transpose(0, 1).reshape(w, 2 * Kp)
            return q.double() * s[:, None]

        return torch.cat(_untile(flat, N, packed.shape[1], split8))[:, :in_features]
    G, per = packed.shape[1], packed.shape[2]
    group = (per - 8) * 2

    def split4(t: torch.Tensor, w: int) -> torch.Tensor:
        t = t.view(G, w * per)
        d = t[:, : 4 * w].contiguous().view(torch.float32).double().T  # [w, G]
        c = t[:, 4 * w : 8 * w].contiguous().view(torch.float32).double().T
        b = t[:, 8 * w :].reshape(G, group // 4, w, 2).permute(2, 0, 1, 3)  # [w, G, q, 2]
        u = torch.stack([b[..., 0] & 15, b[..., 1] & 15, b[..., 0] >> 4, b[..., 1] >> 4], -1)
        u = u.reshape(w, G, group).double()
        return (d[..., None] * (INT4_OFFSET + u) + c[..., None]).reshape(w, G * group)

    return torch.cat(_untile(flat, N, G * per, split4))[:, :in_features]


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [..., K] bf16 -> [..., N] bf16; packed from pack() (any WEIGHTS; the C++ ops:
    # cpu_ext.load() must have returned True)
    if packed.dtype == torch.bfloat16:
        return gemv.linear(x, packed, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x2.new_empty(x2.shape[0], packed.shape[0])
    op = torch.ops.peftserve_cpu.gemv_int8 if packed.dtype == torch.int8 else (
        torch.ops.peftserve_cpu.gemv_int4)  # fmt: skip
    op(out, x2, packed, bias)
    return out.view(*lead, packed.shape[0])


def linear_reference(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The op's specification in float64 over the dequantized weights.
    x: [M, K] -> [M, N] float64."""
    y = x.double() @ dequantize(packed, x.shape[-1]).T
    return y + bias.double() if bias is not None else y
