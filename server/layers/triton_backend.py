"""The CUDA backend (backend.py's TritonBackend): Triton kernels for the step's ops.

    backend = TritonBackend(lora_tiles=TileTable.for_device(name, env))   # select_backend's
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from peftserve.kernels.checks import LowrankChecks, check_rows_args
from peftserve.kernels.cpu_packed import PackedLora
from peftserve.kernels.lora_tiles import TileTable
from peftserve.kernels.segment_meta import SegmentMeta
from peftserve.layers.attention import AttentionMetadata
from peftserve.layers.backend import Backend


class TritonBackend(Backend):
    """CUDA: Triton kernels for the step's ops; prefill attention and the matmuls stay torch's.

    Decode attention reads the paged cache in place (kernels/triton_paged_attention.py);
    RMSNorm (with the residual add), rotary + the K/V write and SwiGLU are one launch each
    (kernels/triton_fused.py); adapter deltas of up to `rows_max_tokens` tokens (a decode
    step) run token by token, one launch per stage for every slice and adapter, reading only
    device tensors (kernels/triton_lowrank_rows.py), larger steps by segments (triton_shrink /
    triton_expand), each module's tiles from `lora_tiles` (kernels/lora_tiles.py: the
    device's tuned table, else the kernels' defaults). The Triton modules are imported on
    first use; on the CPU they run under TRITON_INTERPRET (tests only).
    """

    name = "triton"
    captures_graphs = True
    reads_decode_lens = True

    def __init__(self, rows_max_tokens: int = 128, lora_tiles: TileTable | None = None) -> None:
        self.rows_max_tokens = rows_max_tokens
        self.lora_tiles = lora_tiles or TileTable()
        self.check_lowrank_args = LowrankChecks()  # the slot buffers' layouts checked once

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if x.dim() != 2 or weight.dtype != x.dtype:
            return super().rms_norm(x, weight, eps)
        from peftserve.kernels.triton_fused import rms_norm_triton

        return rms_norm_triton(x, weight, eps)[1]

    def add_rms_norm(
        self, x: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        if x.dim() != 2 or weight.dtype != x.dtype or residual.dtype != x.dtype:
            return super().add_rms_norm(x, residual, weight, eps)
        from peftserve.kernels.triton_fused import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)

    def rotary_and_cache(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, cache: Tensor, slot_mapping: Tensor,
        heads: int, kv_heads: int,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # In place, as the CPU backend's C++ op: q and k rotated inside qkv.
        from peftserve.kernels.triton_fused import rotary_and_cache_triton

        if qkv.stride(1) != 1:
            qkv = qkv.contiguous()
        rotary_and_cache_triton(qkv, cos, sin, cache, slot_mapping, heads, kv_heads)
        T, D = qkv.shape[0], cache.shape[-1]
        q, k, v = qkv.view(T, heads + 2 * kv_heads, D).split((heads, kv_heads, kv_heads), dim=1)
        return q, k, v

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        from peftserve.kernels.triton_fused import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)

    def decode_attention(
        self, q: Tensor, cache: Tensor, meta: AttentionMetadata, scale: float
    ) -> Tensor:
        from peftserve.kernels.triton_paged_attention import paged_decode_attention

        assert meta.decode_blocks is not None and meta.decode_lens is not None
        return paged_decode_attention(
            q, cache, meta.decode_blocks, meta.decode_lens, meta.block_size, scale
        )

    def lowrank_delta(
        self, y: Tensor, x: Tensor, A: Tensor, B: Tensor, rank: Tensor, scale: Tensor,
        meta: SegmentMeta, slice_sizes: tuple[int, ...],
        packed: Sequence[PackedLora | None] | None = None, **bottleneck: Any,
    ) -> None:  # fmt: skip
        if meta.is_empty:
            return
        b_down, b_up, act = (bottleneck.get(k) for k in ("b_down", "b_up", "act"))
        self.check_lowrank_args(y, x, A, B, rank, scale, meta, slice_sizes, b_down, b_up, act)
        if meta.num_tokens <= self.rows_max_tokens:
            from peftserve.kernels.triton_lowrank_stages import lowrank_delta_rows_triton

            tiles = self.lora_tiles.pick(x.shape[1], slice_sizes, A.shape[2], x.shape[0])
            lowrank_delta_rows_triton(y, x, A, B, rank, scale, meta.token_slot, slice_sizes,
                                      b_down=b_down, b_up=b_up, act=act, tiles=tiles)  # fmt: skip
            return
        from peftserve.kernels.triton_expand import launch_expand
        from peftserve.kernels.triton_shrink import launch_shrink

        v = launch_shrink(x, A, rank, meta, b_down, act)
        launch_expand(y, v, B, rank, scale, meta, slice_sizes, b_up)

    def lowrank_delta_tokens(
        self, y: Tensor, x: Tensor, A: Tensor, B: Tensor, rank: Tensor, scale: Tensor,
        token_slot: Tensor, slice_sizes: tuple[int, ...], **bottleneck: Any,
    ) -> None:  # fmt: skip
        # Two launches whatever the adapters, no host metadata: graph-safe.
        from peftserve.kernels.triton_lowrank_stages import lowrank_delta_rows_triton

        check_rows_args(y, x, A, B, rank, scale, token_slot, slice_sizes)
        tiles = self.lora_tiles.pick(x.shape[1], slice_sizes, A.shape[2], x.shape[0])
        lowrank_delta_rows_triton(y, x, A, B, rank, scale, token_slot, slice_sizes,
                                  tiles=tiles, **bottleneck)  # fmt: skip

    def lowrank_begin_tokens(
        self, x: Tensor, A: Tensor, B: Tensor, rank: Tensor, scale: Tensor, token_slot: Tensor,
        slice_sizes: tuple[int, ...], stream: torch.cuda.Stream | None = None,
        whole: bool = False,
    ) -> Any:  # fmt: skip
        from peftserve.kernels.triton_lowrank_stages import delta_stage, shrink_stage

        check_rows_args(None, x, A, B, rank, scale, token_slot, slice_sizes)
        tiles = self.lora_tiles.pick(x.shape[1], slice_sizes, A.shape[2], x.shape[0])
        if whole:
            return delta_stage(x, A, B, rank, scale, token_slot, slice_sizes, tiles, stream)
        return shrink_stage(x, A, rank, token_slot, tiles[0], stream), tiles[1]

    def lowrank_end_tokens(
        self, y: Tensor, begun: Any, B: Tensor, rank: Tensor, scale: Tensor, token_slot: Tensor,
        slice_sizes: tuple[int, ...], stream: torch.cuda.Stream | None = None,
    ) -> None:  # fmt: skip
        from peftserve.kernels.triton_lowrank_rows import expand_rows_triton
        from peftserve.kernels.triton_lowrank_stages import Delta

        want = (token_slot.shape[0], B.shape[1])
        if tuple(y.shape) != want:
            raise ValueError(f"y must be {list(want)}, got {list(y.shape)}")
        if stream is not None:
            torch.cuda.current_stream(y.device).wait_stream(stream)
        if isinstance(begun, Delta):  # the whole delta (whole=True)
            y.add_(begun.d)
            return
        (v, ranks), tiles = begun
        expand_rows_triton(y, v, B, rank, scale, token_slot, slice_sizes, tiles=tiles,
                           token_rank=ranks)  # fmt: skip
