// The whole decoder stack of a decode-only, adapter-free step in one call (half precision).
//
// On a small model a CPU decode step's matmuls take ~30 ms and the Python around them (about
// forty torch calls per layer, module calls, views) another ~8 ms at any batch size. This op
// runs the same sequence the Python layer runs (models/llama.py, DecoderLayer.forward with the
// C++ ops of fused_cpu.cpp and paged_attention_cpu.cpp), op for op, with ATen's own linear for
// the matmuls: its results are the Python path's, bit for bit. LoRA deltas come in the fused
// form (kernels/cpu_lowrank.py, lora_delta_fused_cpu: one shrink matmul over every active
// slot's columns, a mask keeping each row's own slot, one addmm per output slice), planned in
// Python once per step (adapters/slots.py, AdapterHook.decode_plan). Steps with prefill chunks,
// bottleneck adapters or a LoRA the fused form does not pay on stay in Python.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace peftserve_cpu {

namespace {

// y += the fused LoRA delta of projection `j` (its entry in the plan), reading its slices from
// `spec` and `lora_B` at the cursors, which it advances.
struct LoraPlan {
  const c10::List<std::optional<at::Tensor>>& A;
  const c10::List<std::optional<at::Tensor>>& masks;
  at::TensorList B;
  at::IntArrayRef spec;
  const std::optional<at::Tensor>& tokens;
  size_t spec_at = 0;
  size_t b_at = 0;

  void add(const at::Tensor& y, const at::Tensor& x, int64_t j) {
    const int64_t n = next();
    if (A.empty()) {
      return;
    }
    const std::optional<at::Tensor> a = A.get(j);
    if (!a.has_value()) {
      TORCH_CHECK(n == 0, "decode_forward: slices given for a projection without A");
      return;
    }
    const std::optional<at::Tensor> mask = masks.get(j);
    TORCH_CHECK(mask.has_value(), "decode_forward: projection ", j, " has A but no mask");
    at::Tensor v = at::linear(tokens.has_value() ? x.index_select(0, *tokens) : x, *a);
    v.mul_(*mask);
    const at::Tensor d = tokens.has_value() ? at::zeros({v.size(0), y.size(1)}, y.options()) : y;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t o0 = next(), o1 = next(), c0 = next(), c1 = next();
      TORCH_CHECK(b_at < B.size(), "decode_forward: fewer B slices than the spec names");
      d.narrow(1, o0, o1 - o0).addmm_(v.narrow(1, c0, c1 - c0), B[b_at++]);
    }
    if (tokens.has_value()) {
      y.index_add_(0, *tokens, d);
    }
  }

  int64_t next() {
    if (A.empty()) {
      return 0;
    }
    TORCH_CHECK(spec_at < spec.size(), "decode_forward: the LoRA spec ends early");
    return spec[spec_at++];
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
                          const c10::List<std::optional<at::Tensor>>& lora_A,
                          const c10::List<std::optional<at::Tensor>>& lora_mask,
                          at::TensorList lora_B, at::IntArrayRef lora_spec,
                          const std::optional<at::Tensor>& lora_tokens) {
  const int64_t layers = static_cast<int64_t>(input_norm.size());
  TORCH_CHECK(h_in.dim() == 2 && h_in.is_contiguous(), "decode_forward: h must be [T, hidden]");
  TORCH_CHECK(qkv_w.size() == layers && o_w.size() == layers && post_norm.size() == layers &&
                  gate_up_w.size() == layers && down_w.size() == layers,
              "decode_forward: one weight per layer in every list");
  TORCH_CHECK(qkv_b.empty() || static_cast<int64_t>(qkv_b.size()) == layers,
              "decode_forward: qkv_b must be empty or one per layer");
  TORCH_CHECK(o_b.empty() || static_cast<int64_t>(o_b.size()) == layers,
              "decode_forward: o_b must be empty or one per layer");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == layers && kv_cache.is_contiguous(),
              "decode_forward: kv_cache must be a contiguous [layers, 2, kv_heads, slots, dim]");
  TORCH_CHECK(lora_A.empty() || (static_cast<int64_t>(lora_A.size()) == 4 * layers &&
                                   lora_mask.size() == lora_A.size()),
              "decode_forward: lora_A and lora_mask must be empty or 4 per layer");
  const int64_t T = h_in.size(0);
  const int64_t D = kv_cache.size(4);
  LoraPlan lora{lora_A, lora_mask, lora_B, lora_spec, lora_tokens};
  at::Tensor h = h_in;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor cache = kv_cache.select(0, l);
    at::Tensor x = at::empty_like(h);
    rms_norm(x, h, input_norm[l], eps);
    const at::Tensor qkv =
        qkv_b.empty() ? at::linear(x, qkv_w[l]) : at::linear(x, qkv_w[l], qkv_b[l]);
    lora.add(qkv, x, 4 * l);
    rotary_and_cache(qkv, cos, sin, cache, slot_mapping, heads, kv_heads);
    const at::Tensor q = qkv.view({T, heads + 2 * kv_heads, D}).narrow(1, 0, heads);
    at::Tensor attn = at::empty({T, heads, D}, h.options());
    paged_decode_attention(attn, q, cache, block_tables, context_lens, block_size, scale);
    const at::Tensor a = attn.view({T, heads * D});
    const at::Tensor o = o_b.empty() ? at::linear(a, o_w[l]) : at::linear(a, o_w[l], o_b[l]);
    lora.add(o, a, 4 * l + 1);
    h = at::add(h, o);
    x = at::empty_like(h);
    rms_norm(x, h, post_norm[l], eps);
    const at::Tensor gu = at::linear(x, gate_up_w[l]);
    lora.add(gu, x, 4 * l + 2);
    at::Tensor act = at::empty({T, gu.size(1) / 2}, gu.options());
    silu_and_mul(act, gu);
    const at::Tensor down = at::linear(act, down_w[l]);
    lora.add(down, act, 4 * l + 3);
    h = at::add(h, down);
  }
  TORCH_CHECK(lora.spec_at == lora_spec.size() && lora.b_at == lora_B.size(),
              "decode_forward: the LoRA spec and B slices were not all used");
  at::Tensor out = at::empty_like(h);
  rms_norm(out, h, final_norm, eps);
  return out;
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def(
      "decode_forward(Tensor h, Tensor[] input_norm, Tensor[] qkv_w, Tensor[] qkv_b, "
      "Tensor[] o_w, Tensor[] o_b, Tensor[] post_norm, Tensor[] gate_up_w, Tensor[] down_w, "
      "Tensor final_norm, Tensor(a!) kv_cache, Tensor cos, Tensor sin, Tensor slot_mapping, "
      "Tensor block_tables, Tensor context_lens, int block_size, int heads, int kv_heads, "
      "float scale, float eps, Tensor?[] lora_A, Tensor?[] lora_mask, Tensor[] lora_B, "
      "int[] lora_spec, Tensor? lora_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("decode_forward", &peftserve_cpu::decode_forward);
}
