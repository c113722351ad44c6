// The small per-layer ops of a decode step, each one pass over its rows instead of the five to
// eight torch ops (and as many temporaries) that spell it. On a 135M model at batch 32 those
// torch ops cost about a third of the step beside the matmuls.
//
// Each op rounds where its torch spelling rounds (layers/norm.py, layers/rotary.py, the SwiGLU
// in models/llama.py): intermediate products are rounded to the tensor's dtype, so in bf16 the
// results equal the torch path's bit for bit except where torch's own vectorized exp differs
// in the last place (silu), and where rms_norm's fp32 sum of squares, ordered by the
// compiler's vector lanes, differs in its last place from torch's reduction and a normalized
// value rounds to the neighbouring bf16 (rare: 3 and 7 of 20,000 random 5 x 32 draws built
// for x86-64-v3 and for this machine's AVX-512).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

#include <cmath>
#include <limits>
#include <cstdint>

namespace peftserve_cpu {


// out = weight * dtype(x * rsqrt(mean(x^2) + eps)), the normalization in fp32 (transformers'
// LlamaRMSNorm). x, out: [T, H] contiguous; weight: [H].
template <typename scalar_t>
void rms_norm_kernel(scalar_t* out, const scalar_t* x, const scalar_t* w, int64_t T, int64_t H,
                     float eps) {
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      using F = Fp32<scalar_t>;
      const scalar_t* xr = x + t * H;
      scalar_t* orow = out + t * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        const float v = F::load(xr, i);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        F::store(orow, i, F::load(w, i) * F::round(F::load(xr, i) * inv));
      }
    }
  });
}

// residual = dtype(residual + x) in place, then out = rms_norm(residual): a decoder layer's
// residual add and the next norm in one pass, with the roundings of `h = h + x; norm(h)`.
template <typename scalar_t>
void add_rms_norm_kernel(scalar_t* out, scalar_t* residual, const scalar_t* x, const scalar_t* w,
                         int64_t T, int64_t H, float eps) {
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      using F = Fp32<scalar_t>;
      scalar_t* rr = residual + t * H;
      const scalar_t* xr = x + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        F::store(rr, i, F::load(rr, i) + F::load(xr, i));
      }
    }
  });
  rms_norm_kernel<scalar_t>(out, residual, w, T, H, eps);
}

void add_rms_norm(const at::Tensor& out, const at::Tensor& residual, const at::Tensor& x,
                  const at::Tensor& weight, double eps) {
  check_dense_cpu(out, "add_rms_norm", "out");
  check_dense_cpu(residual, "add_rms_norm", "residual");
  check_dense_cpu(x, "add_rms_norm", "x");
  check_dense_cpu(weight, "add_rms_norm", "weight");
  TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous() && x.sizes() == residual.sizes() &&
                  x.is_contiguous() && out.sizes() == residual.sizes() && out.is_contiguous(),
              "add_rms_norm: out, residual and x must be contiguous [T, hidden]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "add_rms_norm: weight must be [hidden]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == weight.scalar_type() &&
                  x.scalar_type() == residual.scalar_type(),
              "add_rms_norm: out, residual, x and weight must share one dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_kernel<scalar_t>(out.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                  x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), x.size(0),
                                  x.size(1), static_cast<float>(eps));
  });
}

void rms_norm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
              double eps) {
  check_dense_cpu(out, "rms_norm", "out");
  check_dense_cpu(x, "rms_norm", "x");
  check_dense_cpu(weight, "rms_norm", "weight");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() &&
                  out.sizes() == x.sizes(),
              "rms_norm: x and out must be contiguous [T, hidden]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight must be [hidden]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "rms_norm: x, out and weight must share one dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                              weight.data_ptr<scalar_t>(), x.size(0), x.size(1),
                              static_cast<float>(eps));
  });
}

// In place on the fused projection's rows qkv [T, (heads + 2 * kv_heads) * D]: rotates the q
// and k heads (x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]), then writes each
// token's k and v heads to its cache slot. cache: [2, kv_heads, slots, D] (one layer);
// cos, sin: [T, D]; slot_mapping: [T] int64.
// No fused multiply-add here: torch computes x * cos and rotate_half(x) * sin as two rounded
// products, then their sum, and so must this for fp32 results equal to the torch path's (in
// fp32 F::round is no rounding, so nothing else keeps g++'s default -ffp-contract=fast from
// fusing them). The attribute only holds inside the function that carries it, and code inlined
// into another function takes that one's options: a lambda given to at::parallel_for is inlined
// into the OpenMP region of torch's header, built with fp-contract=fast, under -std=c++17 (what
// torch 2.11's extension builder passes; 2.13's -std=c++20 happened to keep it out of line).
// So the arithmetic lives in this function, which is never inlined.
template <typename scalar_t>
__attribute__((noinline, optimize("fp-contract=off"))) void rotate_head(scalar_t* x,
                                                                        const scalar_t* c,
                                                                        const scalar_t* s,
                                                                        int64_t half) {
  using F = Fp32<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = F::load(x, i);
    const float x2 = F::load(x, i + half);
    const float a1 = F::round(x1 * F::load(c, i));
    const float b1 = F::round(-x2 * F::load(s, i));
    const float a2 = F::round(x2 * F::load(c, i + half));
    const float b2 = F::round(x1 * F::load(s, i + half));
    F::store(x, i, a1 + b1);
    F::store(x, i + half, a2 + b2);
  }
}

template <typename scalar_t>
void rotary_kernel(scalar_t* qkv, const scalar_t* cos, const scalar_t* sin, scalar_t* cache,
                   const int64_t* slots, int64_t T, int64_t heads, int64_t kv_heads, int64_t D,
                   int64_t num_slots) {
  const int64_t half = D / 2;
  const int64_t row = (heads + 2 * kv_heads) * D;
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* r = qkv + t * row;
      const scalar_t* c = cos + t * D;
      const scalar_t* s = sin + t * D;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        rotate_head(r + h * D, c, s, half);
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < kv_heads; ++h) {
        const scalar_t* k = r + (heads + h) * D;
        const scalar_t* v = r + (heads + kv_heads + h) * D;
        scalar_t* kc = cache + (h * num_slots + slot) * D;
        scalar_t* vc = cache + ((kv_heads + h) * num_slots + slot) * D;
        for (int64_t i = 0; i < D; ++i) {
          kc[i] = k[i];
          vc[i] = v[i];
        }
      }
    }
  });
}

void rotary_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& cache, const at::Tensor& slot_mapping, int64_t heads,
                      int64_t kv_heads) {
  check_dense_cpu(qkv, "rotary_and_cache", "qkv");
  check_dense_cpu(cos, "rotary_and_cache", "cos");
  check_dense_cpu(sin, "rotary_and_cache", "sin");
  check_dense_cpu(cache, "rotary_and_cache", "cache");
  check_dense_cpu(slot_mapping, "rotary_and_cache", "slot_mapping");
  TORCH_CHECK(heads > 0 && kv_heads > 0, "rotary_and_cache: heads and kv_heads must be positive, got ", heads, " and ", kv_heads);
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.size(1) == kv_heads &&
                  cache.is_contiguous(),
              "rotary_and_cache: cache must be a contiguous [2, kv_heads, slots, head_dim]");
  const int64_t D = cache.size(3), T = qkv.size(0);
  TORCH_CHECK(D % 2 == 0, "rotary_and_cache: head_dim must be even");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * D,
              "rotary_and_cache: qkv must be a contiguous [T, (heads + 2 * kv_heads) * head_dim]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "rotary_and_cache: cos and sin must be contiguous [T, head_dim]");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == sin.scalar_type() &&
                  qkv.scalar_type() == cache.scalar_type(),
              "rotary_and_cache: qkv, cos, sin and cache must share one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == T && slot_mapping.is_contiguous(),
              "rotary_and_cache: slot_mapping must be a contiguous int64 [T]");
  const int64_t num_slots = cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rotary_and_cache: slot ", slots[t],
                " outside the cache");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_and_cache", [&] {
        rotary_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                                sin.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), slots, T,
                                heads, kv_heads, D, num_slots);
      });
}

// out[t] = dtype(silu(gate)) * up, gate and up the two halves of gate_up [T, 2 * I].
template <typename scalar_t>
void silu_and_mul_kernel(scalar_t* out, const scalar_t* gu, int64_t T, int64_t I) {
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      using F = Fp32<scalar_t>;
      const scalar_t* g = gu + t * 2 * I;
      const scalar_t* u = g + I;
      scalar_t* o = out + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float x = F::load(g, i);
        F::store(o, i, F::round(x * peftserve_cpu::sigmoid(x)) * F::load(u, i));
      }
    }
  });
}

void silu_and_mul(const at::Tensor& out, const at::Tensor& gate_up) {
  check_dense_cpu(out, "silu_and_mul", "out");
  check_dense_cpu(gate_up, "silu_and_mul", "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_and_mul: gate_up must be a contiguous [T, 2 * intermediate]");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == gate_up.size(0) &&
                  out.size(1) * 2 == gate_up.size(1) &&
                  out.scalar_type() == gate_up.scalar_type(),
              "silu_and_mul: out must be a contiguous [T, intermediate] of gate_up's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
        silu_and_mul_kernel<scalar_t>(out.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(),
                                      gate_up.size(0), out.size(1));
      });
}

// Each row's index of its largest value, as torch.argmax(dim=-1): the first one on ties, the
// first NaN where a row has any. Greedy sampling's whole cost beside the LM head: torch's own
// reduction reads a [32, 49152] fp32 block at ~5 GB/s on one core here; two vectorized passes
// over each row (the second from cache) run at several times that.
template <typename scalar_t>
void argmax_rows_kernel(int64_t* out, const scalar_t* x, int64_t rows, int64_t n) {
  using F = Fp32<scalar_t>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * n;
      float m = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t i = 0; i < n; ++i) {
        const float v = F::load(row, i);
        nan |= static_cast<int>(v != v);
        m = v > m ? v : m;
      }
      int64_t at = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float v = F::load(row, i);
        if (nan ? v != v : v == m) {
          at = i;
          break;
        }
      }
      out[r] = at;
    }
  });
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_dense_cpu(x, "argmax_rows", "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
              "argmax_rows: x must be a contiguous non-empty [rows, n]");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_rows", [&] {
    argmax_rows_kernel<scalar_t>(out.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), x.size(0),
                                 x.size(1));
  });
  return out;
}

// Sizes the calling thread's OpenMP team for this library's parallel loops now, from torch's
// thread count, and returns it. at::parallel_for does this at a thread's first call through an
// inline function whose once-per-thread flag is this library's own copy, not libtorch's: a
// thread that had run torch's ops at one count got the count the process held at its first
// call of ours (another thread's torch.set_num_threads(1), there, left the server's step
// thread on one core). The thread that runs the steps calls this as it starts.
int64_t init_threads() {
  at::internal::lazy_init_num_threads();
  return at::get_num_threads();
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def("init_threads() -> int", &peftserve_cpu::init_threads);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def(
      "add_rms_norm(Tensor(a!) out, Tensor(b!) residual, Tensor x, Tensor weight, float eps) "
      "-> ()");
  m.def(
      "rotary_and_cache(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) cache, "
      "Tensor slot_mapping, int heads, int kv_heads) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("rms_norm", &peftserve_cpu::rms_norm);
  m.impl("add_rms_norm", &peftserve_cpu::add_rms_norm);
  m.impl("rotary_and_cache", &peftserve_cpu::rotary_and_cache);
  m.impl("silu_and_mul", &peftserve_cpu::silu_and_mul);
  m.impl("argmax_rows", &peftserve_cpu::argmax_rows);
}
