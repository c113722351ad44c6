// Decode attention over the paged KV cache, reading K/V blocks where they lie.
//
// One query token per sequence. The torch path (layers/attention.py) first gathers each
// sequence's blocks into a padded [kv_heads, B, max_blocks * block_size, head_dim] copy, then
// runs two batched matmuls and a masked softmax: on a CPU decode step that gather moves every
// context byte twice more than attention needs. Here each (sequence, kv head) pair walks its
// block table once for the scores and once for the values, with fp32 accumulation; the query
// heads of a GQA group share each K/V row they read. Positions at or past a sequence's context
// length are never read.
//
// Layouts (as the engine keeps them):
//   out, q        [B, heads, head_dim]                  the cache's dtype; out contiguous, q
//                                                       contiguous in head_dim
//   cache         [2, kv_heads, num_slots, head_dim]    one layer, K then V; slot = block * bs + i
//   block_tables  [B, max_blocks] int64                 entries past a sequence's blocks unused
//   context_lens  [B] int64                             >= 1, <= max_blocks * block_size

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace peftserve_cpu {

template <typename scalar_t>
inline void prefetch(const scalar_t* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(scalar_t)); off += 64) {
    __builtin_prefetch(c + off);
  }
}

// Softmax over each of `rows` rows of `len` scores, in place, unnormalized: exp(s - max);
// 1 / sum of each row goes to inv_sum (applied to the output instead).
inline void softmax_rows(float* scores, int64_t rows, int64_t len, float* inv_sum) {
  for (int64_t g = 0; g < rows; ++g) {
    float* sg = scores + g * len;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t l = 0; l < len; ++l) {
      m = std::max(m, sg[l]);
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < len; ++l) {
      sg[l] = peftserve_cpu::exp_nonpositive(sg[l] - m);
      sum += sg[l];
    }
    inv_sum[g] = 1.f / sum;
  }
}

// K/V rows to fp32 (bf16 by its bits, so the loop vectorizes).
template <typename scalar_t>
inline void to_float(float* dst, const scalar_t* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = peftserve_cpu::Fp32<scalar_t>::load(src, i);
  }
}

template <typename scalar_t>
void decode_attention_kernel(
    scalar_t* out,
    const scalar_t* q,
    int64_t q_stride_b,
    int64_t q_stride_h,
    const scalar_t* cache,
    const int64_t* tables,
    const int64_t* lens,
    int64_t batch,
    int64_t heads,
    int64_t kv_heads,
    int64_t head_dim,
    int64_t num_slots,
    int64_t max_blocks,
    int64_t block_size,
    float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t D = head_dim;
  const scalar_t* k_cache = cache;
  const scalar_t* v_cache = cache + kv_heads * num_slots * D;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), row(D), inv_sum(group), scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / kv_heads;
      const int64_t kh = work % kv_heads;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* qh = q + b * q_stride_b + (kh * group + g) * q_stride_h;
        for (int64_t d = 0; d < D; ++d) {
          qf[g * D + d] = static_cast<float>(qh[d]) * scale;
        }
      }
      scores.resize(group * len);
      const scalar_t* kh_base = k_cache + kh * num_slots * D;
      const scalar_t* vh_base = v_cache + kh * num_slots * D;
      // scores[g, l] = q_g . k_l (scaled)
      const int64_t block_elems = block_size * D;
      const int64_t num_ctx_blocks = (len + block_size - 1) / block_size;
      prefetch(kh_base + table[0] * block_elems, block_elems);
      for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = std::min(block_size, len - start);
        const int64_t j = start / block_size;
        const scalar_t* kb = kh_base + table[j] * block_elems;
        // The blocks lie anywhere in the cache: ask for the next K block and this V block
        // (read by the second pass) while this one is computed.
        if (j + 1 < num_ctx_blocks) {
          prefetch(kh_base + table[j + 1] * block_elems, block_elems);
        }
        prefetch(vh_base + table[j] * block_elems, n * D);
        for (int64_t i = 0; i < n; ++i) {
          to_float(row.data(), kb + i * D, D);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) {
              s += qg[d] * row[d];
            }
            scores[g * len + start + i] = s;
          }
        }
      }
      softmax_rows(scores.data(), group, len, inv_sum.data());
      // out[g] = sum_l p[g, l] v_l
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = std::min(block_size, len - start);
        const scalar_t* vb = vh_base + table[start / block_size] * block_elems;
        for (int64_t i = 0; i < n; ++i) {
          to_float(row.data(), vb + i * D, D);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + start + i];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
              ag[d] += p * row[d];
            }
          }
        }
      }
      scalar_t* ob = out + (b * heads + kh * group) * D;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t d = 0; d < D; ++d) {
          peftserve_cpu::Fp32<scalar_t>::store(ob, g * D + d, acc[g * D + d] * inv_sum[g]);
        }
      }
    }
  });
}

// `generic`: the plain loops on any CPU (PEFTSERVE_CPU_ATTENTION=generic; the tests run both).

#if defined(__AVX512F__)
#include <immintrin.h>

// The same attention with AVX-512 for head_dim = 16 * C and G query heads per KV head (the
// common shapes: C = 4 or 8, G <= 8): q, the output accumulators and a K/V row stay in
// registers (bf16 b32 decode on SmolLM2: 3.2 ms a step from cache against 8.3 for the plain
// loops). No software prefetch: asking for the next pair's rows made it slower here. The plain
// loops above keep the rest (and machines without AVX-512).
template <typename scalar_t>
inline __m512 load16(const scalar_t* p);

template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}

template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename scalar_t, int C, int G>
void decode_attention_avx512(scalar_t* out, const scalar_t* q, int64_t q_stride_b,
                             int64_t q_stride_h, const scalar_t* cache, const int64_t* tables,
                             const int64_t* lens, int64_t batch, int64_t kv_heads,
                             int64_t num_slots, int64_t max_blocks, int64_t block_size,
                             float scale) {
  constexpr int64_t D = 16 * C;
  const scalar_t* k_cache = cache;
  const scalar_t* v_cache = cache + kv_heads * num_slots * D;
  const auto rows_of = [&](int64_t work, int64_t start) {  // the pair's K/V offset at start
    const int64_t b = work / kv_heads, kh = work % kv_heads;
    return (kh * num_slots + tables[b * max_blocks + start / block_size] * block_size +
            start % block_size) * D;
  };
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / kv_heads, kh = work % kv_heads, len = lens[b];
      __m512 qv[G][C];
      for (int g = 0; g < G; ++g) {
        const scalar_t* qh = q + b * q_stride_b + (kh * G + g) * q_stride_h;
        for (int c = 0; c < C; ++c) {
          qv[g][c] = _mm512_mul_ps(load16(qh + 16 * c), _mm512_set1_ps(scale));
        }
      }
      scores.resize(G * len);
      for (int64_t start = 0; start < len; start += block_size) {
        const scalar_t* kb = k_cache + rows_of(work, start);
        const int64_t n = std::min(block_size, len - start);
        for (int64_t i = 0; i < n; ++i) {
          __m512 k[C];
          for (int c = 0; c < C; ++c) {
            k[c] = load16(kb + i * D + 16 * c);
          }
          for (int g = 0; g < G; ++g) {
            __m512 s = _mm512_mul_ps(qv[g][0], k[0]);
            for (int c = 1; c < C; ++c) {
              s = _mm512_fmadd_ps(qv[g][c], k[c], s);
            }
            scores[g * len + start + i] = _mm512_reduce_add_ps(s);
          }
        }
      }
      float inv_sum[G];
      softmax_rows(scores.data(), G, len, inv_sum);
      __m512 acc[G][C];
      for (int g = 0; g < G; ++g) {
        for (int c = 0; c < C; ++c) {
          acc[g][c] = _mm512_setzero_ps();
        }
      }
      for (int64_t start = 0; start < len; start += block_size) {
        const scalar_t* vb = v_cache + rows_of(work, start);
        const int64_t n = std::min(block_size, len - start);
        for (int64_t i = 0; i < n; ++i) {
          __m512 v[C];
          for (int c = 0; c < C; ++c) {
            v[c] = load16(vb + i * D + 16 * c);
          }
          for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * len + start + i]);
            for (int c = 0; c < C; ++c) {
              acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
            }
          }
        }
      }
      scalar_t* ob = out + (b * kv_heads + kh) * G * D;
      for (int g = 0; g < G; ++g) {
        alignas(64) float row[D];
        for (int c = 0; c < C; ++c) {
          _mm512_store_ps(row + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_sum[g])));
        }
        for (int64_t d = 0; d < D; ++d) {
          peftserve_cpu::Fp32<scalar_t>::store(ob, g * D + d, row[d]);
        }
      }
    }
  });
}

// The AVX-512 kernel for this shape, or nullptr.
template <typename scalar_t>
using AttentionKernel = void (*)(scalar_t*, const scalar_t*, int64_t, int64_t, const scalar_t*,
                                 const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, float);

template <typename scalar_t, int C>
AttentionKernel<scalar_t> avx512_kernel_for_group(int64_t group) {
  switch (group) {
    case 1: return decode_attention_avx512<scalar_t, C, 1>;
    case 2: return decode_attention_avx512<scalar_t, C, 2>;
    case 3: return decode_attention_avx512<scalar_t, C, 3>;
    case 4: return decode_attention_avx512<scalar_t, C, 4>;
    case 5: return decode_attention_avx512<scalar_t, C, 5>;
    case 6: return decode_attention_avx512<scalar_t, C, 6>;
    case 7: return decode_attention_avx512<scalar_t, C, 7>;
    case 8: return decode_attention_avx512<scalar_t, C, 8>;
    default: return nullptr;
  }
}

template <typename scalar_t>
AttentionKernel<scalar_t> avx512_kernel(int64_t head_dim, int64_t group) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return nullptr;
  }
  if (head_dim == 64) {
    return avx512_kernel_for_group<scalar_t, 4>(group);
  }
  if (head_dim == 128) {
    return avx512_kernel_for_group<scalar_t, 8>(group);
  }
  return nullptr;
}
#endif  // __AVX512F__

void paged_decode_attention(
    const at::Tensor& out,
    const at::Tensor& q,
    const at::Tensor& cache,
    const at::Tensor& block_tables,
    const at::Tensor& context_lens,
    int64_t block_size,
    double scale,
    bool generic) {
  const char* op = "paged_decode_attention";
  check_dense_cpu(out, op, "out");
  check_dense_cpu(q, op, "q");
  check_dense_cpu(cache, op, "cache");
  check_dense_cpu(block_tables, op, "block_tables");
  check_dense_cpu(context_lens, op, "context_lens");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [B, heads, head_dim]");
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2, "cache must be [2, kv_heads, slots, dim]");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache.size(1), num_slots = cache.size(2);
  TORCH_CHECK(cache.size(3) == head_dim, "cache head_dim ", cache.size(3), " != q's ", head_dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and cache must share one dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.is_contiguous() && cache.is_contiguous(),
              "out and cache must be contiguous, q contiguous in head_dim");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                  block_tables.size(0) == batch && block_tables.is_contiguous(),
              "block_tables must be a contiguous int64 [B, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.dim() == 1 &&
                  context_lens.size(0) == batch && context_lens.is_contiguous(),
              "context_lens must be a contiguous int64 [B]");
  TORCH_CHECK(block_size > 0 && num_slots % block_size == 0, "bad block_size");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t num_blocks = num_slots / block_size;
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size,
                "context length ", lens[b], " of sequence ", b, " does not fit its block table");
    for (int64_t j = 0; j < (lens[b] + block_size - 1) / block_size; ++j) {
      const int64_t blk = tables[b * max_blocks + j];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block ", blk, " outside the cache");
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
#if defined(__AVX512F__)
        if (const auto fast = avx512_kernel<scalar_t>(head_dim, heads / kv_heads);
            fast != nullptr && !generic) {
          fast(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
               cache.data_ptr<scalar_t>(), tables, lens, batch, kv_heads, num_slots, max_blocks,
               block_size, static_cast<float>(scale));
          return;
        }
#endif
        decode_attention_kernel<scalar_t>(
            out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
            cache.data_ptr<scalar_t>(), tables,
            lens, batch, heads, kv_heads, head_dim, num_slots, max_blocks, block_size,
            static_cast<float>(scale));
      });
}

}  // namespace peftserve_cpu

TORCH_LIBRARY(peftserve_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, "
      "Tensor context_lens, int block_size, float scale, bool generic=False) -> ()");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &peftserve_cpu::paged_decode_attention);
}
