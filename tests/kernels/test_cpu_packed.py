"""cpu_packed.pack_lora_layers (a slot's LoRA packed for the CPU kernels, several layers at once)
against the packing written out slice by slice: A's rows at their exact ranks, B block-diagonal
with each slice's scale folded in (fp32, rounded once), each B^T block contiguous."""

from __future__ import annotations

import pytest
import torch

from peftserve.kernels.cpu_packed import pack_lora_layers


def expected(A, B, ranks, scales, slot, sizes):
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    packed_b = torch.zeros(sum(sizes), sum(ranks), dtype=B.dtype)
    a_rows, blocks, col = [], [], 0
    for i, r in enumerate(ranks):
        if not r:
            continue
        a_rows.append(A[i, slot, :r])
        block = (B[slot, offsets[i] : offsets[i + 1], :r].float() * scales[i]).to(B.dtype)
        packed_b[offsets[i] : offsets[i + 1], col : col + r] = block
        blocks.append(block.t().reshape(-1))
        col += r
    return torch.cat(a_rows), packed_b, torch.cat(blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ranks", [(5,), (7, 0, 3), (0, 16, 16), (2, 9)])
def test_each_layer_packed_as_written_out(dtype, ranks):
    g = torch.Generator().manual_seed(sum(ranks))
    n, S, R, d_in = len(ranks), 4, 16, 37
    sizes = (23, 9, 9)[:n]
    layers = 3
    As = [torch.randn(n, S, R, d_in, generator=g).to(dtype) for _ in range(layers)]
    Bs = [torch.randn(S, sum(sizes), R, generator=g).to(dtype) for _ in range(layers)]
    scales = [[0.5 + j + 0.25 * i for i in range(n)] for j in range(layers)]  # per layer
    packed = pack_lora_layers(As, Bs, ranks, scales, 2, sizes)
    assert packed is not None and len(packed) == layers
    for j, p in enumerate(packed):
        a, b, blocks = expected(As[j], Bs[j], ranks, scales[j], 2, sizes)
        assert torch.equal(p.A, a) and torch.equal(p.B, b) and torch.equal(p.B_blocks, blocks)
        assert p.A.is_contiguous() and p.B.is_contiguous() and p.B_blocks.is_contiguous()
        assert p.ranks == ranks and p.offsets[-1] == sum(sizes)
        # one layer alone packs the same
        alone = pack_lora_layers(As[j : j + 1], Bs[j : j + 1], ranks, scales[j : j + 1], 2, sizes)
        assert alone is not None and torch.equal(alone[0].B, p.B)


def test_no_rank_on_any_slice_is_none():
    A, B = torch.zeros(2, 3, 8, 16), torch.zeros(3, 20, 8)
    assert pack_lora_layers([A, A], [B, B], (0, 0), [[1.0, 1.0]] * 2, 1, (10, 10)) is None
