"""The step's ops on one device, chosen once when the engine is built.

    backend = select_backend("auto", device)   # CpuBackend | TritonBackend | Backend (reference)
    h = backend.rms_norm(x, weight, eps)

Layers, the model, the sampler and the adapter hook call their backend and never ask which
device they are on. Three kinds, like vLLM's punica selector but an object passed down:

- `Backend`, the reference: plain torch on any device, every dtype, dense weights, the adapters'
  stacked buffers. The oracle, and what a test picks to compare the others with.
- `CpuBackend`: the C++ ops of kernels/csrc (norms, rotary + KV write, SwiGLU, decode attention
  reading KV blocks in place, argmax, token-by-token adapter deltas, the one-call decode stack),
  bf16/fp16 base weights packed once for oneDNN, each adapter's weights packed per slot; bf16
  base weights in the streaming layout of the C++ matrix-vector kernel (kernels/gemv.py) for
  steps of up to gemv.GEMV_MAX_ROWS rows (every step: then no oneDNN copy). Without a compiler
  (`native=False`, named "torch") its ops are the reference's and the adapters take the packed
  torch forms.
- `TritonBackend` (triton_backend.py): Triton kernels for the adapters, decode attention over
  the paged cache and the small fused ops (norms, rotary + KV write, SwiGLU); the reference's
  torch ops otherwise.

The environment switches are read here, once, by `select_backend`: PEFTSERVE_CPU_KERNELS=0
(no C++ ops), PEFTSERVE_PACKED_WEIGHTS=0 (dense weights), PEFTSERVE_CPU_GEMV=0 (no
matrix-vector kernel: oneDNN at every batch size), PEFTSERVE_CPU_ATTENTION=generic (the
decode attention's plain loops instead of its AVX-512 or AVX2 code); on CUDA,
PEFTSERVE_LORA_TILES=FILE (the LoRA kernels' tiles per module shape from FILE instead of the
table shipped for the GPU, kernels/lora_tiles.py; empty: the kernels' defaults).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from peftserve.config import BACKENDS
from peftserve.kernels import add_lowrank_delta, cpu_ext, gemv, huge_pages, packed_linear
from peftserve.kernels.checks import check_lowrank_args
from peftserve.kernels.cpu_lowrank import lowrank_delta_cpu
from peftserve.kernels.cpu_packed import PackedBottleneck, PackedLora, bottleneck_delta_packed_cpu
from peftserve.kernels.cpu_rows import bottleneck_delta_rows_cpu
from peftserve.kernels.lora_tiles import TileTable
from peftserve.kernels.segment_meta import SegmentMeta
from peftserve.kernels.token_slot import lowrank_delta_token_slot
from peftserve.layers.attention import AttentionMetadata, decode_attention, write_kv
from peftserve.layers.rotary import apply_rotary

log = logging.getLogger(__name__)
ENV_CPU_ATTENTION = "PEFTSERVE_CPU_ATTENTION"
ENV_CPU_GEMV = "PEFTSERVE_CPU_GEMV"


class Backend:
    """The reference: plain torch on any device."""

    name = "reference"
    packs_adapters = False  # adapters' weights packed per slot beside the stacked buffers
    decode_stack = False  # a decode-only step's whole stack in one call (decode_forward)
    captures_graphs = False  # the static decode step is captured as CUDA graphs
    # decode attention takes the context lengths (AttentionMetadata.decode_lens) and never the
    # mask of real positions, so a step need not build one
    reads_decode_lens = False

    def packs_weights(self, dtype: torch.dtype) -> bool:
        """True when base matmul weights of `dtype` are held packed (packed_linear)."""
        return False

    def gemv_max_rows(self, dtype: torch.dtype) -> int:
        """Steps of up to this many rows run base matmuls of `dtype` through the C++
        matrix-vector kernel (kernels/gemv.py); 0: never."""
        return 0

    def bind_thread(self) -> None:
        """Called on the thread that will run the steps, its torch thread count set: sizes
        that thread's OpenMP team now. torch does it at a thread's first parallel op, from a
        count shared by the process that any later torch.set_num_threads changes (the adapter
        loaders set 1 on their threads)."""
        torch.get_num_threads()

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Zero-filled storage for the adapters' slot buffers."""
        return torch.zeros(*shape, dtype=dtype, device=device)

    def hold_streamed(self, tensors: list[Tensor]) -> list[Tensor]:
        """Where the weights every small step reads whole are kept (the list may be emptied
        as they move): as they are here."""
        return tensors

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden], in fp32 as transformers' Llama computes it
        return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x + residual and its RMSNorm: -> (sum, normed), both [T, hidden]."""
        h = x + residual
        return h, self.rms_norm(h, weight, eps)

    def rotary_and_cache(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
        slot_mapping: torch.Tensor, heads: int, kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """qkv: [T, (heads + 2 kv_heads) * D]; cos, sin: [T, 1, D]; cache: [2, kv_heads, slots,
        D]. Rotates q and k, writes k and v to their cache slots; -> q [T, heads, D] and k, v
        [T, kv_heads, D]."""
        T, D = qkv.shape[0], cache.shape[-1]
        q_out, kv_out = heads * D, kv_heads * D
        v = qkv[:, q_out + kv_out :].view(T, kv_heads, D)
        # q and k heads side by side: one rotary application for both.
        qk = apply_rotary(qkv[:, : q_out + kv_out].view(T, -1, D), cos, sin)
        q, k = qk.split((heads, kv_heads), dim=1)
        write_kv(cache, slot_mapping, k, v)
        return q, k, v

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [T, 2 * I] -> [T, I]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def decode_attention(
        self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q: [nd, heads, D] (one token per decoding sequence, its K/V already in `cache`)
        -> [nd, heads, D]."""
        assert meta.decode_blocks is not None and meta.decode_mask is not None
        # Gather whole blocks (one index per block, not per token): [2, kv_heads, nd, ctx, dim]
        blocks = cache.unflatten(2, (-1, meta.block_size))[:, :, meta.decode_blocks].flatten(3, 4)
        matmuls = self.matmul_attention(q.dtype)
        return decode_attention(q, blocks[0], blocks[1], meta.decode_mask, scale, matmuls)

    def matmul_attention(self, dtype: torch.dtype) -> bool:
        """True where torch attention runs faster as two matmuls than as SDPA with a mask."""
        return False

    def argmax_rows(self, logits: torch.Tensor) -> list[int]:
        """Each row's argmax, as logits.argmax(-1) (the first index on ties, NaN first)."""
        return logits.argmax(dim=-1).tolist()

    def lowrank_delta(
        self, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        rank: torch.Tensor, scale: torch.Tensor, meta: SegmentMeta,
        slice_sizes: tuple[int, ...], packed: Sequence[PackedLora | None] | None = None,
        **bottleneck: Any,
    ) -> None:  # fmt: skip
        """y += each token's slot's delta, in place (kernels/dispatch.add_lowrank_delta's
        arguments; `bottleneck`: b_down, b_up, act). `packed` is ignored here: the reference
        reads the stacked buffers."""
        if meta.is_empty:
            return
        b_down, b_up, act = (bottleneck.get(k) for k in ("b_down", "b_up", "act"))
        check_lowrank_args(y, x, A, B, rank, scale, meta, slice_sizes, b_down, b_up, act)
        lowrank_delta_cpu(y, x, A, B, rank, scale, meta, slice_sizes, b_down, b_up, act)

    def bottleneck_rows(
        self, y: torch.Tensor, packed: Sequence[PackedBottleneck | None], meta: SegmentMeta
    ) -> None:
        """A placement's bottleneck adapters from their packed weights (packs_adapters only)."""
        raise NotImplementedError(f"the {self.name} backend keeps no packed adapter weights")

    def lowrank_delta_tokens(
        self, y: Tensor, x: Tensor, A: Tensor, B: Tensor, rank: Tensor, scale: Tensor,
        token_slot: Tensor, slice_sizes: tuple[int, ...], **bottleneck: Any,
    ) -> None:  # fmt: skip
        """y += each token's slot's delta, in place, the slot read from `token_slot` ([T],
        -1 = none) on the device: no host metadata, static shapes (graph-safe). `bottleneck`
        as in lowrank_delta. Here the gathering torch form (kernels/token_slot.py)."""
        lowrank_delta_token_slot(y, x, A, B, rank, scale, token_slot, slice_sizes, **bottleneck)

    def lowrank_begin_tokens(
        self, x: Tensor, A: Tensor, B: Tensor, rank: Tensor, scale: Tensor, token_slot: Tensor,
        slice_sizes: tuple[int, ...], stream: torch.cuda.Stream | None = None,
        whole: bool = False,
    ) -> Any:  # fmt: skip
        """A LoRA's lowrank_delta_tokens in two halves, the first before y exists -> what
        lowrank_end_tokens takes. Where a backend splits the work (Triton), this half is the
        shrink of x (`whole`: the shrink and the expand, into a delta of its own), and with
        `stream` (CUDA) it runs there, beside the current stream's next work (the base matmul),
        from the current stream's work so far (x). Here nothing runs yet: the second half
        computes the whole delta."""
        return x, A

    def lowrank_end_tokens(
        self, y: Tensor, begun: Any, B: Tensor, rank: Tensor, scale: Tensor, token_slot: Tensor,
        slice_sizes: tuple[int, ...], stream: torch.cuda.Stream | None = None,
    ) -> None:  # fmt: skip
        """The second half: y += the delta from `begun` (lowrank_begin_tokens' with the same
        `stream`, which the current stream waits for first)."""
        x, A = begun
        self.lowrank_delta_tokens(y, x, A, B, rank, scale, token_slot, slice_sizes)

    def decode_forward(self, *args: Any) -> torch.Tensor:
        """kernels/csrc/decode_forward_cpu.cpp's op (decode_stack only)."""
        raise NotImplementedError(f"the {self.name} backend has no one-call decode stack")


REFERENCE = Backend()  # stateless: one serves every caller


class CpuBackend(Backend):
    """The CPU: the C++ ops where they are built (`native`), packed weights."""

    packs_adapters = True

    def __init__(
        self, *, native: bool, packed_weights: bool = True, generic_attention: bool = False,
        decode_stack: bool = True, gemv_rows: int = gemv.GEMV_MAX_ROWS, huge_pages: bool = True,
    ) -> None:  # fmt: skip
        self.native = native
        self.huge_pages = huge_pages
        self.gemv_rows = gemv_rows
        self.name = "cpp" if native else "torch"
        self.packed_weights = packed_weights
        self.generic_attention = generic_attention
        self.decode_stack = native and decode_stack
        self.reads_decode_lens = native  # csrc/paged_attention_cpu.cpp
        self.ops = torch.ops.peftserve_cpu if native else None

    def packs_weights(self, dtype: torch.dtype) -> bool:
        # No oneDNN copy where the matrix-vector kernel serves every step (gemv.GEMV_MAX_ROWS).
        return (
            self.packed_weights
            and packed_linear.supported(dtype)
            and self.gemv_max_rows(dtype) < gemv.EVERY_STEP
        )

    def gemv_max_rows(self, dtype: torch.dtype) -> int:
        return self.gemv_rows if self.native and dtype == torch.bfloat16 else 0

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """From calloc (numpy's zeros) as untouched zero pages: a module's slot buffers for 64
        slots of rank 64 are ~1.8 GB on a 135M model, and `torch.zeros` wrote every byte of
        them (6.8 s) inside the step that first used the module; here pages are only mapped
        when a slot's rows are written."""
        raw = torch.from_numpy(np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8))
        return raw.view(dtype).view(*shape)

    def bind_thread(self) -> None:
        # The C++ ops' parallel loops size their team through their own copy of torch's
        # once-per-thread flag (csrc/fused_cpu.cpp, init_threads): set both.
        super().bind_thread()
        if self.native:
            self.ops.init_threads()

    def hold_streamed(self, tensors: list[Tensor]) -> list[Tensor]:
        """In one buffer of transparent huge pages (kernels/huge_pages.py): a decode step reads
        them whole, and a pass over them on 4 KB pages took 1.03-1.14x as long."""
        return huge_pages.gather(tensors) if self.huge_pages else tensors

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # Half precision: one C++ pass with the same roundings (bf16: equal to torch's but
        # where the two fp32 sums of squares, ordered apart, differ in their last place and a
        # value rounds to the neighbouring bf16, rarely); fp32, the parity dtype, keeps
        # transformers' op sequence.
        if self.native and x.dtype != torch.float32 and x.is_contiguous():
            out = torch.empty_like(x)
            self.ops.rms_norm(out, x, weight, eps)
            return out
        return super().rms_norm(x, weight, eps)

    def rotary_and_cache(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, cache: Tensor, slot_mapping: Tensor,
        heads: int, kv_heads: int,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # One pass in every dtype (fp32 results bit-equal to the torch spelling): rotary on q
        # and k in place, k and v into their cache slots.
        if not self.native:
            return super().rotary_and_cache(qkv, cos, sin, cache, slot_mapping, heads, kv_heads)
        T, D = qkv.shape[0], cache.shape[-1]
        self.ops.rotary_and_cache(qkv, cos[:, 0], sin[:, 0], cache, slot_mapping, heads, kv_heads)
        q, k, v = qkv.view(T, heads + 2 * kv_heads, D).split((heads, kv_heads, kv_heads), dim=1)
        return q, k, v

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        # fp32 keeps transformers' SwiGLU: another exp, and 30 layers drift ~1e-4 from it.
        if not self.native or gate_up.dtype == torch.float32:
            return super().silu_and_mul(gate_up)
        act = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        self.ops.silu_and_mul(act, gate_up)
        return act

    def decode_attention(
        self, q: Tensor, cache: Tensor, meta: AttentionMetadata, scale: float
    ) -> Tensor:
        if not self.native or meta.decode_lens is None:
            return super().decode_attention(q, cache, meta, scale)
        # Reads each sequence's blocks in place (kernels/csrc/paged_attention_cpu.cpp).
        out = torch.empty_like(q)
        self.ops.paged_decode_attention(
            out, q, cache, meta.decode_blocks, meta.decode_lens, meta.block_size, scale,
            self.generic_attention,
        )  # fmt: skip
        return out

    def matmul_attention(self, dtype: torch.dtype) -> bool:
        # With a mask, the CPU's SDPA kernels are up to 10x slower in bf16/fp16 at decode
        # shapes than two matmuls; in fp32 SDPA is 1.3x faster than them.
        return dtype != torch.float32

    def argmax_rows(self, logits: Tensor) -> list[int]:
        if not self.native or not logits.numel():
            return super().argmax_rows(logits)
        return self.ops.argmax_rows(logits.contiguous()).tolist()

    def lowrank_delta(
        self, y: Tensor, x: Tensor, A: Tensor, B: Tensor, rank: Tensor, scale: Tensor,
        meta: SegmentMeta, slice_sizes: tuple[int, ...],
        packed: Sequence[PackedLora | None] | None = None, **bottleneck: Any,
    ) -> None:  # fmt: skip
        add_lowrank_delta(y, x, A, B, rank, scale, meta, slice_sizes, packed=packed,
                          native=self.native, **bottleneck)  # fmt: skip

    def bottleneck_rows(
        self, y: Tensor, packed: Sequence[PackedBottleneck | None], meta: SegmentMeta
    ) -> None:
        if self.native:  # exact ranks, token by token in C++
            bottleneck_delta_rows_cpu(y, packed, meta)
        else:  # one segment at a time in torch
            bottleneck_delta_packed_cpu(y, packed, meta)

    def decode_forward(self, *args: Any) -> Tensor:
        return self.ops.decode_forward(*args, self.generic_attention)


def select_backend(name: str, device: torch.device) -> Backend:
    """The backend `name` (one of BACKENDS) for `device`; "auto": triton on CUDA, on the CPU
    cpp where the C++ kernels build and pass their self-test, else torch."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return Backend()
    if device.type == "cuda":
        if name not in ("auto", "triton"):
            raise ValueError(f"the {name} backend runs on the CPU, not on {device}")
        from peftserve.layers.triton_backend import TritonBackend  # (it imports this module)

        tiles = TileTable.for_device(torch.cuda.get_device_name(device), dict(os.environ))
        log.info("LoRA kernel tiles: %s", tiles.source)
        return TritonBackend(lora_tiles=tiles)
    if name == "triton":
        raise ValueError(f"the triton backend needs a CUDA device, not {device}")
    native = name != "torch" and cpu_ext.load()
    if name == "cpp" and not native:
        raise ValueError(f"the C++ CPU kernels are not available: {cpu_ext.unavailable_reason()}")
    return CpuBackend(
        native=native,
        packed_weights=os.environ.get(packed_linear.ENV_SWITCH, "1") != "0",
        generic_attention=os.environ.get(ENV_CPU_ATTENTION, "") == "generic",
        gemv_rows=gemv.GEMV_MAX_ROWS if os.environ.get(ENV_CPU_GEMV, "1") != "0" else 0,
    )
