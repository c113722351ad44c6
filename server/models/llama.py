"""Llama-family causal LM (Llama, SmolLM, Mistral, Qwen2) in peftserve's own layers.

transformers only supplies the config and the weights. q/k/v and gate/up are fused into one
matmul each; their output slices stay named so adapters can update each slice separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from peftserve.errors import UnsupportedModel
from peftserve.kernels import gemv, packed_linear, quant
from peftserve.kernels.screened_head import ScreenedHead
from peftserve.layers.attention import AttentionMetadata, paged_attention
from peftserve.layers.backend import Backend
from peftserve.layers.linear import AdaptableLinear, DeltaHook
from peftserve.layers.norm import RMSNorm
from peftserve.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            max_positions=config.max_position_embeddings,
        )


@dataclass(frozen=True)
class StepContext:
    """What every layer needs for one step, built once by the model runner."""

    attn: AttentionMetadata
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor  # [T, 1, head_dim]
    hook: DeltaHook | None = None  # adapter deltas for linear layers (None: base only)


class DecoderLayer(nn.Module):
    def __init__(
        self, layer: int, shape: ModelShape, eps: float, w: dict[str, torch.Tensor],
        backend: Backend,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backend = backend
        q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.scale = shape.head_dim**-0.5
        self.input_norm = RMSNorm(shape.hidden, eps, backend)
        self.post_attn_norm = RMSNorm(shape.hidden, eps, backend)
        self.input_norm.weight.data = w["input_layernorm.weight"]
        self.post_attn_norm.weight.data = w["post_attention_layernorm.weight"]
        qkv_bias = None
        if "self_attn.q_proj.bias" in w:
            qkv_bias = torch.cat([w[f"self_attn.{p}_proj.bias"] for p in "qkv"])
        self.qkv = AdaptableLinear(
            layer,
            "qkv",
            torch.cat([w[f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            qkv_bias,
            (q_out, kv_out, kv_out),
        )
        self.o = AdaptableLinear(
            layer, "o", w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")
        )
        self.gate_up = AdaptableLinear(
            layer,
            "gate_up",
            torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
            None,
            (shape.intermediate, shape.intermediate),
        )
        self.down = AdaptableLinear(layer, "down", w["mlp.down_proj.weight"], None)
        self.q_out, self.kv_out = q_out, kv_out

    def forward(
        self, h: torch.Tensor, mlp_out: torch.Tensor | None, cache: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [T, hidden], the residual stream; mlp_out: the previous layer's MLP output, not
        yet added to h (None at the first layer); cache: [2, kv_heads, slots, head_dim] for this
        layer. -> (h, this layer's MLP output): the residual adds are each fused into the
        RMSNorm after them, one launch on the Triton backend."""
        T = h.shape[0]
        h, x = self.input_norm.add(h, mlp_out)
        qkv = self.qkv(x, ctx.hook)
        q, k, v = self.backend.rotary_and_cache(
            qkv, ctx.cos, ctx.sin, cache, ctx.attn.slot_mapping, self.heads, self.kv_heads
        )
        a = paged_attention(q, k, v, cache, ctx.attn, self.scale, self.backend)
        h, x = self.post_attn_norm.add(h, self.o(a.reshape(T, self.q_out), ctx.hook))
        act = self.backend.silu_and_mul(self.gate_up(x, ctx.hook))
        return h, self.down(act, ctx.hook)


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        backend: Backend,
        weights: str = "bf16",
        screened_head: bool = True,
    ) -> None:
        super().__init__()
        self.shape = ModelShape.from_config(config)
        if weights not in quant.WEIGHTS:
            raise ValueError(f"weights must be one of {quant.WEIGHTS}, got {weights!r}")
        if weights != "bf16" and dtype != torch.bfloat16:
            raise UnsupportedModel(f"{weights} weights compute in bfloat16, not {dtype}")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModel("mlp_bias=True is not supported")
        state = {
            k.removeprefix("model."): v.to(device=device, dtype=dtype) for k, v in state.items()
        }
        eps = config.rms_norm_eps
        self.embed = nn.Parameter(state["embed_tokens.weight"], requires_grad=False)  # [V, hidden]
        self.layers = nn.ModuleList()
        for i in range(self.shape.layers):
            prefix = f"layers.{i}."
            w = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            self.layers.append(DecoderLayer(i, self.shape, eps, w, backend))
        self.norm = RMSNorm(self.shape.hidden, eps, backend)
        self.norm.weight.data = state["norm.weight"]
        lm_head = state.get("lm_head.weight")
        if lm_head is None or getattr(config, "tie_word_embeddings", False):
            lm_head = self.embed
        self.lm_head = lm_head  # [V, hidden]
        # CPU half precision: every matmul weight packed for oneDNN (kernels/packed_linear.py),
        # and in bf16 with the C++ kernels also for the matrix-vector kernel (kernels/gemv.py,
        # steps of up to gemv_rows rows); the dense layer weights are dropped, the embedding
        # table stays for the lookups.
        self.lm_head_packed: torch.Tensor | None = None
        # int8/int4 (kernels/quant.py) with the C++ kernels: every step through them; without
        # them the dequantized weights, rounded to bf16, dense.
        self.lm_head_gemv: torch.Tensor | None = None  # [V, ceil(hidden/2), 2] or quantized
        # bf16 with the C++ kernels: greedy rows' tokens through an int8 screen of the head
        # (kernels/screened_head.py), the full head's argmax bit for bit
        self.screened_head: ScreenedHead | None = None
        self.weights = weights
        onednn, self.gemv_rows = backend.packs_weights(dtype), backend.gemv_max_rows(dtype)
        if weights != "bf16" and backend.name != "cpp":
            self._dequantized(weights)
        elif weights != "bf16":
            onednn, self.gemv_rows = False, gemv.EVERY_STEP
        if onednn or self.gemv_rows:
            for layer in self.layers:
                for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                    lin.pack(onednn, self.gemv_rows, weights)
            if onednn:
                self.lm_head_packed = packed_linear.pack(self.lm_head)
            if self.gemv_rows:
                self.lm_head_gemv = quant.pack(self.lm_head, quant.LM_HEAD[weights])
                if screened_head and weights == "bf16":
                    self.screened_head = ScreenedHead(self.lm_head_gemv, self.lm_head)
                self._hold_streamed(backend)
            if self.lm_head is not self.embed:
                self.lm_head = None  # type: ignore[assignment]
        self.rotary = RotaryEmbedding(config, self.shape.head_dim, device, self.shape.max_positions)
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self._decode_weights: dict[bool, tuple] = {}

    def _hold_streamed(self, backend: Backend) -> None:
        """The matrix-vector kernel's weights, which a small step reads whole, where the
        backend keeps them (the CPU: one buffer of huge pages), in the order a step reads them."""
        lins = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                          layer.down)]  # fmt: skip
        head = self.screened_head
        # a greedy step reads the screen where others read the head
        screen = [head.screen] if head is not None else []
        streamed = [lin.gemv for lin in lins] + screen + [self.lm_head_gemv]
        for lin in lins:  # the list holds them alone: each freed as soon as it is moved
            lin.gemv = None
        held = backend.hold_streamed(streamed)
        for lin, w in zip(lins, held, strict=False):
            lin.gemv = w
        self.lm_head_gemv = held[-1]
        if head is not None:
            head.screen, head.packed = held[-2], held[-1]

    def _dequantized(self, weights: str) -> None:
        """Every matmul weight replaced by its `weights` form dequantized to bf16 (dense)."""
        def roundtrip(w: torch.Tensor, kind: str) -> torch.Tensor:
            return quant.dequantize(quant.pack(w, kind), w.shape[1]).to(w.dtype)

        for layer in self.layers:
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                assert lin.weight is not None
                lin.weight.data = roundtrip(lin.weight.data, weights)
        self.lm_head = roundtrip(self.lm_head, quant.LM_HEAD[weights])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        return F.embedding(input_ids, self.embed)

    def _cpp_decode_weights(self, rows: int) -> tuple:
        """The weights decode_forward takes for a step of `rows` rows, as lists in layer order
        (the matrix-vector kernel's or oneDNN's form; built once per form: the base weights
        never change after loading)."""
        small = rows <= self.gemv_rows
        if small not in self._decode_weights:
            L = self.layers
            self._decode_weights[small] = (
                [x.input_norm.weight for x in L],
                [x.qkv.matmul_weight(rows) for x in L],
                [x.qkv.bias for x in L] if L[0].qkv.bias is not None else [],
                [x.o.matmul_weight(rows) for x in L],
                [x.o.bias for x in L] if L[0].o.bias is not None else [],
                [x.post_attn_norm.weight for x in L],
                [x.gate_up.matmul_weight(rows) for x in L],
                [x.down.matmul_weight(rows) for x in L],
                self.norm.weight,
            )
        return self._decode_weights[small]

    def _cpp_decode_plan(self, h: torch.Tensor, ctx: StepContext) -> tuple | None:
        """For a decode-only step on the CPU without adapter deltas, or in half precision with
        deltas a DecodePlan expresses (adapters/slots.py), the delta arguments of the one-call
        decode stack (kernels/csrc/decode_forward_cpu.cpp: the same ops as the layers below and
        the hook's apply(), in the same order); None when the step runs layer by layer here."""
        a = ctx.attn
        if not (
            not a.prefills
            and a.num_decodes == h.shape[0]
            and a.decode_lens is not None
            and self.backend.decode_stack
        ):
            return None
        if ctx.hook is None:  # fp32 too: the C++ keeps the Python layers' fp32 op sequence
            return [], [], [], None, True
        if self.dtype == torch.float32:  # the plan's forms are the hook's half-precision ones
            return None
        plan = ctx.hook.decode_plan(self.shape.layers)
        if plan is None:
            return None
        return plan.tensors, plan.spec, plan.scales, plan.sorted_tokens, plan.in_order

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, kv_cache: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # h: [T, hidden] input embeddings; kv_cache: [layers, 2, kv_heads, slots, head_dim]
        deltas = self._cpp_decode_plan(h, ctx)
        if deltas is not None:
            a, layer0 = ctx.attn, self.layers[0]
            return self.backend.decode_forward(
                h, *self._cpp_decode_weights(h.shape[0]), kv_cache, ctx.cos[:, 0], ctx.sin[:, 0],
                a.slot_mapping, a.decode_blocks, a.decode_lens, a.block_size,
                layer0.heads, layer0.kv_heads, layer0.scale, self.norm.eps, *deltas,
            )  # fmt: skip
        mlp_out = None
        for i, layer in enumerate(self.layers):
            h, mlp_out = layer(h, mlp_out, kv_cache[i], ctx)
        return self.norm.add(h, mlp_out)[1]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, hidden] (only the rows that sample) -> [B, vocab] fp32, written into `out`
        when given (the conversion to fp32 is then that copy: one launch, not two)."""
        if self.lm_head_gemv is not None and (
            h.shape[0] <= self.gemv_rows or self.lm_head_packed is None
        ):
            y = quant.linear(h, self.lm_head_gemv, None)
        elif self.lm_head_packed is not None:
            y = packed_linear.linear(h, self.lm_head_packed, None)
        else:
            y = F.linear(h, self.lm_head)
        return y.float() if out is None else out.copy_(y)

    @torch.inference_mode()
    def greedy_tokens(self, h: torch.Tensor) -> list[int] | None:
        """h: [B, hidden] (rows that sample greedily) -> argmax_rows(self.logits(h)), bit for
        bit, through the screened head; None where there is none or it declines (then
        self.logits)."""
        if self.screened_head is None:
            return None
        tokens = self.screened_head.argmax(h)
        return tokens.tolist() if tokens is not None else None

    def lm_head_dense(self) -> torch.Tensor:
        # [V, hidden]
        if self.lm_head_gemv is not None and self.lm_head_gemv.dtype != torch.bfloat16:
            return quant.dequantize(self.lm_head_gemv, self.shape.hidden).to(torch.bfloat16)
        if self.lm_head is None and self.lm_head_gemv is not None:
            return gemv.unpack(self.lm_head_gemv, self.shape.hidden)
        if self.lm_head is None:
            return self.lm_head_packed.to_dense()  # type: ignore[union-attr]
        return self.lm_head
