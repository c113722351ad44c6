// The whole decoder stack of a decode-only step in one call.
//
// On a small model a CPU decode step's matmuls take ~30 ms and the Python around them (about
// forty torch calls per layer, module calls, views) another ~8 ms at any batch size. This op
// runs the same sequence the Python layer runs (models/llama.py, DecoderLayer.forward with the
// C++ ops of fused_cpu.cpp and paged_attention_cpu.cpp), op for op, with the matmul the Python
// layer calls for each weight form (base_linear): its results are the Python path's, bit for
// bit. Adapter deltas come as a plan built in Python once per step (adapters/slots.py,
// AdapterHook.decode_plan): the calls of the token-by-token ops (lowrank_rows_cpu.cpp) the
// hook makes in half precision on the CPU. Steps with prefill chunks stay in Python.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

#include <vector>

namespace peftserve_cpu {

namespace {

// buf as a [rows, n] tensor of `options`: itself, or made anew the first time or for another n.
const at::Tensor& step_buffer(at::Tensor& buf, int64_t rows, int64_t n,
                              const at::TensorOptions& options) {
  if (!buf.defined() || buf.size(0) != rows || buf.size(1) != n) {
    buf = at::empty({rows, n}, options);
  }
  return buf;
}

// A base projection of x: bf16 weights in the matrix-vector kernel's layout (kernels/gemv.py,
// a 3-D [N, ceil(K/2), 2] tensor) and int8 / int4 ones (kernels/quant.py) go through those
// kernels (gemv_bf16_cpu.cpp, gemv_quant_cpu.cpp) into buf (step_buffer), which is returned;
// weights packed for oneDNN at load (kernels/packed_linear.py, CPU half precision) through the
// op the Python layer calls for them, dense ones through at::linear, each a new tensor. The
// caller picks which form a step passes.
at::Tensor base_linear(at::Tensor& buf, const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& b) {
  const bool quant =
      !w.is_mkldnn() && (w.scalar_type() == at::kChar || w.scalar_type() == at::kByte);
  if (quant || (!w.is_mkldnn() && w.dim() == 3)) {
    step_buffer(buf, x.size(0), w.size(0), x.options());
    if (!quant) {
      gemv_bf16(buf, x, w, b, false, true);
    } else if (w.scalar_type() == at::kChar) {
      gemv_int8(buf, x, w, b, false, true);
    } else {
      gemv_int4(buf, x, w, b, false, true);
    }
    return buf;
  }
  if (!w.is_mkldnn()) {
    return at::linear(x, w, b);
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// The adapter deltas of a step, as adapters/slots.py (AdapterHook.decode_plan) lays them out:
// for each projection, a count of items, each a code and its numbers in `spec`, its tensors in
// `tensors` and its scales in `scales`, consumed in order. Each item is one call of the op its
// Python form calls (lowrank_rows_cpu.cpp, as kernels/cpu_lowrank.py calls it).
constexpr int64_t kLoraRows = 2, kBottleneckRows = 3;

struct DeltaProgram {
  at::TensorList tensors;
  at::IntArrayRef spec;
  at::ArrayRef<double> scales;
  std::optional<at::Tensor> rows;  // sorted_tokens, or none when they are 0..T-1
  size_t spec_at = 0, tensor_at = 0, scale_at = 0;

  int64_t next() {
    TORCH_CHECK(spec_at < spec.size(), "decode_forward: the delta spec ends early");
    return spec[spec_at++];
  }
  at::IntArrayRef take(int64_t n) {
    TORCH_CHECK(n >= 0 && spec_at + n <= spec.size(), "decode_forward: the delta spec ends early");
    const at::IntArrayRef out = spec.slice(spec_at, n);
    spec_at += n;
    return out;
  }
  const at::Tensor& tensor() {
    TORCH_CHECK(tensor_at < tensors.size(), "decode_forward: fewer delta tensors than named");
    return tensors[tensor_at++];
  }

  // Adds a projection's deltas: x is its input (LoRA), y its output, updated in place (a
  // bottleneck reads y as it was before its own update).
  void apply(const at::Tensor& y, const at::Tensor& x) {
    if (spec.empty()) {
      return;
    }
    const int64_t items = next();
    for (int64_t item = 0; item < items; ++item) {
      const int64_t code = next();
      if (code == kLoraRows) {
        lora(y, x);
      } else if (code == kBottleneckRows) {
        bottleneck(y);
      } else {
        TORCH_CHECK(false, "decode_forward: unknown delta item ", code);
      }
    }
  }

  // cpu_lowrank.lora_delta_rows_cpu
  void lora(const at::Tensor& y, const at::Tensor& x) {
    const int64_t n = next(), n_slices = next();
    const at::IntArrayRef offsets = take(n_slices + 1);
    std::vector<int64_t> bounds, ranks;
    std::vector<at::Tensor> A, B_blocks;
    for (int64_t j = 0; j < n; ++j) {
      const at::IntArrayRef b = take(2), r = take(n_slices);
      bounds.insert(bounds.end(), b.begin(), b.end());
      ranks.insert(ranks.end(), r.begin(), r.end());
      A.push_back(tensor());
      B_blocks.push_back(tensor());
    }
    lora_rows(y, x, rows, bounds, A, B_blocks, ranks, offsets);
  }

  // cpu_lowrank.bottleneck_delta_rows_cpu
  void bottleneck(const at::Tensor& y) {
    const int64_t n = next(), act = next();
    const at::IntArrayRef bounds = take(2 * n);
    std::vector<at::Tensor> A, b_down, B_t, b_up;
    for (int64_t j = 0; j < n; ++j) {
      A.push_back(tensor());
      b_down.push_back(tensor());
      B_t.push_back(tensor());
      b_up.push_back(tensor());
    }
    TORCH_CHECK(scale_at + n <= scales.size(), "decode_forward: fewer delta scales than named");
    const at::ArrayRef<double> s = scales.slice(scale_at, n);
    scale_at += n;
    bottleneck_rows(y, rows, bounds, A, b_down, B_t, b_up, s, act);
  }

  void check_used() const {
    TORCH_CHECK(spec_at == spec.size() && tensor_at == tensors.size() &&
                    scale_at == scales.size(),
                "decode_forward: the delta plan was not all used");
  }
};

}  // namespace

at::Tensor decode_forward(const at::Tensor& h_in, at::TensorList input_norm,
                          at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList o_w,
                          at::TensorList o_b, at::TensorList post_norm, at::TensorList gate_up_w,
                          at::TensorList down_w, const at::Tensor& final_norm,
                          const at::Tensor& kv_cache, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& context_lens, int64_t block_size, int64_t heads,
                          int64_t kv_heads, double scale, double eps,
                          at::TensorList delta_tensors, at::IntArrayRef delta_spec,
                          at::ArrayRef<double> delta_scales,
                          const std::optional<at::Tensor>& sorted_tokens, bool in_order,
                          bool generic_attention) {
  const int64_t layers = static_cast<int64_t>(input_norm.size());
  TORCH_CHECK(layers >= 1, "decode_forward: no layers");
  check_dense_cpu(h_in, "decode_forward", "h");
  TORCH_CHECK(h_in.dim() == 2 && h_in.is_contiguous(), "decode_forward: h must be [T, hidden]");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && block_size > 0,
              "decode_forward: heads, kv_heads and block_size must be positive");
  TORCH_CHECK(qkv_w.size() == layers && o_w.size() == layers && post_norm.size() == layers &&
                  gate_up_w.size() == layers && down_w.size() == layers,
              "decode_forward: one weight per layer in every list");
  TORCH_CHECK(qkv_b.empty() || static_cast<int64_t>(qkv_b.size()) == layers,
              "decode_forward: qkv_b must be empty or one per layer");
  TORCH_CHECK(o_b.empty() || static_cast<int64_t>(o_b.size()) == layers,
              "decode_forward: o_b must be empty or one per layer");
  check_dense_cpu(kv_cache, "decode_forward", "kv_cache");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == layers && kv_cache.is_contiguous(),
              "decode_forward: kv_cache must be a contiguous [layers, 2, kv_heads, slots, dim]");
  TORCH_CHECK(delta_spec.empty() || sorted_tokens.has_value(),
              "decode_forward: a delta plan needs sorted_tokens");
  const int64_t T = h_in.size(0);
  const int64_t D = kv_cache.size(4);
  DeltaProgram deltas{delta_tensors, delta_spec, delta_scales,
                      in_order ? std::nullopt : sorted_tokens};
  // fp32, the parity dtype, keeps the Python layers' torch spelling of the norm and SwiGLU
  // (transformers' op sequence); half precision takes the fused C++ ops, as they do. The
  // rotary + cache write is the C++ op in every dtype (fp32: bit-equal to the torch spelling).
  const bool fp32 = h_in.scalar_type() == at::kFloat;
  const auto norm = [&](const at::Tensor& x, const at::Tensor& w) {
    if (fp32) {
      return at::mul(w, at::rms_norm(x, {x.size(1)}, std::nullopt, eps));
    }
    at::Tensor out = at::empty_like(x);
    rms_norm(out, x, w, eps);
    return out;
  };
  // Half precision: each residual add and the norm after it in one pass (add_rms_norm), h
  // updated in place in a copy of the input, x the norm's output buffer; fp32: h = h + y, then
  // the norm, as torch spells it.
  at::Tensor h = fp32 ? h_in : h_in.clone();
  at::Tensor x = norm(h, input_norm[0]);
  const auto add_then_norm = [&](const at::Tensor& y, const at::Tensor& w) {
    if (fp32) {
      h = at::add(h, y);
      x = norm(h, w);
    } else {
      add_rms_norm(x, h, y, w, eps);
    }
  };
  // Each layer's outputs go to buffers made once for the step (base_linear's for the
  // matrix-vector kernels), and the views of them once: making a tensor (an empty, a view)
  // costs 1-5 us on a small CPU, and eleven a layer were ~0.8 ms of a SmolLM2 bf16 decode
  // stack on 2 Zen 3 cores (bench/README.md).
  at::Tensor qkv_buf, o_buf, gu_buf, down_buf, act_buf, q;
  const at::Tensor attn = at::empty({T, heads, D}, h.options());
  const at::Tensor a = attn.view({T, heads * D});
  const auto bias = [](at::TensorList b, int64_t l) {
    return b.empty() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(b[l]);
  };
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor cache = kv_cache.select(0, l);
    const at::Tensor qkv = base_linear(qkv_buf, x, qkv_w[l], bias(qkv_b, l));
    deltas.apply(qkv, x);
    rotary_and_cache(qkv, cos, sin, cache, slot_mapping, heads, kv_heads);
    if (!q.defined() || !q.is_alias_of(qkv)) {
      q = qkv.view({T, heads + 2 * kv_heads, D}).narrow(1, 0, heads);
    }
    paged_decode_attention(attn, q, cache, block_tables, context_lens, block_size, scale,
                           generic_attention);
    const at::Tensor o = base_linear(o_buf, a, o_w[l], bias(o_b, l));
    deltas.apply(o, a);
    add_then_norm(o, post_norm[l]);
    const at::Tensor gu = base_linear(gu_buf, x, gate_up_w[l], std::nullopt);
    deltas.apply(gu, x);
    at::Tensor act;
    if (fp32) {
      const int64_t inter = gu.size(1) / 2;
      act = at::mul(at::silu(gu.narrow(1, 0, inter)), gu.narrow(1, inter, inter));
    } else {
      act = step_buffer(act_buf, T, gu.size(1) / 2, gu.options());
      silu_and_mul(act, gu);
    }
    const at::Tensor down = base_linear(down_buf, act, down_w[l], std::nullopt);
    deltas.apply(down, act);
    add_then_norm(down, l + 1 < layers ? input_norm[l + 1] : final_norm);
  }
  deltas.check_used();
  return x;
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def(
      "decode_forward(Tensor h, Tensor[] input_norm, Tensor[] qkv_w, Tensor[] qkv_b, "
      "Tensor[] o_w, Tensor[] o_b, Tensor[] post_norm, Tensor[] gate_up_w, Tensor[] down_w, "
      "Tensor final_norm, Tensor(a!) kv_cache, Tensor cos, Tensor sin, Tensor slot_mapping, "
      "Tensor block_tables, Tensor context_lens, int block_size, int heads, int kv_heads, "
      "float scale, float eps, Tensor[] delta_tensors, int[] delta_spec, float[] delta_scales, "
      "Tensor? sorted_tokens, bool in_order, bool generic_attention=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("decode_forward", &peftserve_cpu::decode_forward);
}

// Packed weights (oneDNN tensors) among the arguments make the dispatcher look here.
TORCH_LIBRARY_IMPL(peftserve_cpu, MkldnnCPU, m) {
  m.impl("decode_forward", &peftserve_cpu::decode_forward);
}
