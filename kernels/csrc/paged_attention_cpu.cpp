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
// A context longer than PARTITION positions is split (flash-decoding, vLLM's paged attention
// v2, kernels/triton_paged_attention.py): each (sequence, KV head, split) is one piece of work
// leaving its scores' max, its sum of exp and its unnormalized output, and a second pass merges
// a sequence's splits in order. Without it a sequence's attention is at most kv_heads pieces:
// one sequence of SmolLM2 (3 KV heads) kept two threads 2:1 busy, and one of 8 KV heads kept 8
// of 16 cores. The splits depend on a sequence's length alone, so its output does not depend
// on its batch; a context of up to PARTITION positions is one piece, normalized as it always
// was.
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
// each row's max and sum go to row_max and row_sum (the sum divides the output instead).
inline void softmax_rows(float* scores, int64_t rows, int64_t len, float* row_max,
                         float* row_sum) {
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
    row_max[g] = m;
    row_sum[g] = sum;
  }
}

constexpr int64_t PARTITION = 256;  // context positions per split (the Triton kernel's too)

// One piece of work: KV head kh of sequence b over context positions [lo, hi).
struct Piece {
  int64_t b, kh, lo, hi;
  int64_t state;  // -1: the whole context (normalize, write out); else its partial state's index
};

// A split (sequence, KV head): its splits' partial states are `splits` consecutive ones from
// `state`.
struct Merge {
  int64_t b, kh, state, splits;
};

// The pieces of a step in (sequence, KV head, split) order, the merges of its split contexts,
// and how many partial states they need.
struct Plan {
  std::vector<Piece> pieces;
  std::vector<Merge> merges;
  int64_t states = 0;
};

Plan plan_pieces(const int64_t* lens, int64_t batch, int64_t kv_heads) {
  Plan plan;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t splits = (lens[b] + PARTITION - 1) / PARTITION;
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      if (splits > 1) {
        plan.merges.push_back({b, kh, plan.states, splits});
      }
      for (int64_t s = 0; s < splits; ++s) {
        plan.pieces.push_back({b, kh, s * PARTITION, std::min(lens[b], (s + 1) * PARTITION),
                               splits == 1 ? -1 : plan.states++});
      }
    }
  }
  return plan;
}

// Where a piece's positions lie in one layer's K (or V) cache: position pos is row
// table[pos / block_size] * block_size + pos % block_size of its KV head's slots. The kernels
// walk a piece a block at a time: [pos, pos + span(pos)) are rows side by side.
struct PieceRows {
  const int64_t* table;  // the sequence's block table
  int64_t head, block_size, hi, D;  // head: the KV head's first element in the K (or V) cache

  PieceRows(const Piece& pc, const int64_t* tables, int64_t max_blocks, int64_t num_slots,
            int64_t block_size, int64_t D)
      : table(tables + pc.b * max_blocks), head(pc.kh * num_slots * D),
        block_size(block_size), hi(pc.hi), D(D) {}

  // the offset of position pos's row from the cache's K (or V) start
  int64_t at(int64_t pos) const {
    return head + (table[pos / block_size] * block_size + pos % block_size) * D;
  }
  // positions from pos to the end of its block or of the piece, whichever comes first
  int64_t span(int64_t pos) const { return std::min(block_size - pos % block_size, hi - pos); }
  // Blocks lie anywhere in the cache: asks for the rows of the block after pos's, if the piece
  // has one, while pos's is computed.
  template <typename scalar_t>
  void ask_next(const scalar_t* base, int64_t pos) const {
    const int64_t next = pos + span(pos);
    if (next < hi) {
      prefetch(base + at(next), span(next) * D);
    }
  }
};

// A piece's G query rows as fp32, times the softmax scale, into qf [G, D].
template <typename scalar_t>
inline void scaled_queries(float* qf, const scalar_t* q, int64_t q_stride_b, int64_t q_stride_h,
                           const Piece& pc, int64_t G, int64_t D, float scale) {
  for (int64_t g = 0; g < G; ++g) {
    const scalar_t* qh = q + pc.b * q_stride_b + (pc.kh * G + g) * q_stride_h;
    for (int64_t d = 0; d < D; ++d) {
      qf[g * D + d] = peftserve_cpu::Fp32<scalar_t>::load(qh, d) * scale;
    }
  }
}

// A piece's end, from its G query heads' fp32 sums acc [G, D] and their softmax max and sum: a
// whole context's output (acc / sum, as acc * (1 / sum)), or a split's partial state
// [max[G], sum[G], acc[G, D]] in `states`.
template <typename scalar_t>
inline void finish_piece(scalar_t* out, float* states, const Piece& pc, int64_t heads,
                         int64_t G, int64_t D, const float* acc, const float* row_max,
                         const float* row_sum) {
  if (pc.state < 0) {
    scalar_t* ob = out + (pc.b * heads + pc.kh * G) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float inv = 1.f / row_sum[g];
      for (int64_t d = 0; d < D; ++d) {
        peftserve_cpu::Fp32<scalar_t>::store(ob, g * D + d, acc[g * D + d] * inv);
      }
    }
    return;
  }
  float* st = states + pc.state * G * (D + 2);
  std::copy(row_max, row_max + G, st);
  std::copy(row_sum, row_sum + G, st + G);
  std::copy(acc, acc + G * D, st + 2 * G);
}

// Each split context's output from its splits' partial states, merged in split order:
// out = sum_s w_s acc_s / sum_s w_s sum_s, w_s = exp(max_s - max over the splits).
template <typename scalar_t>
void merge_splits(scalar_t* out, const float* states, const Plan& plan, int64_t heads,
                  int64_t G, int64_t D) {
  const int64_t merges = static_cast<int64_t>(plan.merges.size());
  at::parallel_for(0, merges, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t f = begin; f < end; ++f) {
      const Merge& mg = plan.merges[f];
      const int64_t n = mg.splits;
      scalar_t* ob = out + (mg.b * heads + mg.kh * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < n; ++s) {
          m = std::max(m, states[(mg.state + s) * G * (D + 2) + g]);
        }
        float sum = 0.f;
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t s = 0; s < n; ++s) {
          const float* st = states + (mg.state + s) * G * (D + 2);
          const float w = peftserve_cpu::exp_nonpositive(st[g] - m);
          sum += w * st[G + g];
          const float* acc = st + 2 * G + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            o[d] += w * acc[d];
          }
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; ++d) {
          peftserve_cpu::Fp32<scalar_t>::store(ob, g * D + d, o[d] * inv);
        }
      }
    }
  });
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
    float* states,
    const scalar_t* q,
    int64_t q_stride_b,
    int64_t q_stride_h,
    const scalar_t* cache,
    const int64_t* tables,
    const Plan& plan,
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
  const int64_t pieces = static_cast<int64_t>(plan.pieces.size());
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), row(D), row_max(group), row_sum(group);
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const Piece& pc = plan.pieces[work];
      const int64_t lo = pc.lo, hi = pc.hi, len = hi - lo;
      scaled_queries(qf.data(), q, q_stride_b, q_stride_h, pc, group, D, scale);
      scores.resize(group * len);
      const PieceRows rows(pc, tables, max_blocks, num_slots, block_size, D);
      // scores[g, l] = q_g . k_(lo + l) (scaled)
      prefetch(k_cache + rows.at(lo), rows.span(lo) * D);
      for (int64_t pos = lo; pos < hi; pos += rows.span(pos)) {
        const int64_t n = rows.span(pos);
        const scalar_t* kb = k_cache + rows.at(pos);
        // the next K block, and this V block for the second pass
        rows.ask_next(k_cache, pos);
        prefetch(v_cache + rows.at(pos), n * D);
        for (int64_t i = 0; i < n; ++i) {
          to_float(row.data(), kb + i * D, D);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) {
              s += qg[d] * row[d];
            }
            scores[g * len + pos - lo + i] = s;
          }
        }
      }
      softmax_rows(scores.data(), group, len, row_max.data(), row_sum.data());
      // acc[g] = sum_l p[g, l] v_(lo + l)
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = lo; pos < hi; pos += rows.span(pos)) {
        const int64_t n = rows.span(pos);
        const scalar_t* vb = v_cache + rows.at(pos);
        for (int64_t i = 0; i < n; ++i) {
          to_float(row.data(), vb + i * D, D);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + pos - lo + i];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
              ag[d] += p * row[d];
            }
          }
        }
      }
      finish_piece(out, states, pc, heads, group, D, acc.data(), row_max.data(), row_sum.data());
    }
  });
}

// `generic`: the plain loops on any CPU (PEFTSERVE_CPU_ATTENTION=generic; the tests run both).

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

// The same attention with AVX2 and FMA (x86-64-v3) for head_dim = 8 * C and any G: what a CPU
// without AVX-512 runs, and an AVX-512 CPU for the shapes its own code leaves. The plain loops
// above reduce each (row, query head) dot product across its lanes on its own and stage every
// K/V row once per row; here a block's rows are made fp32 once (bf16/fp16 by F16C or shifts)
// and then read from L1 by every query head of the group: eight rows' scores at a time, their
// lanes summed in one tree (hsum8), and the output accumulators held in registers across a
// block, and the next block is asked for while this one is computed. One request of SmolLM2
// at 2,000 positions: its decode step 1.44x (int4) / 1.24x (bf16) as fast as with the plain
// loops (bench/README.md).
template <typename scalar_t>
inline __m256 load8(const scalar_t* p);

template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <>
inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Rows [0, n) of D floats from src: src itself for fp32, else converted into buf.
template <typename scalar_t>
inline const float* fp32_rows(const scalar_t* src, int64_t n, int64_t D, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n * D; i += 8) {
      _mm256_storeu_ps(buf + i, load8(src + i));
    }
    return buf;
  }
}

// Lane r of the result: the sum of a[r]'s eight lanes, ((0+1) + (2+3)) + ((4+5) + (6+7)).
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <typename scalar_t, int C>
void decode_attention_avx2(scalar_t* out, float* states, const scalar_t* q, int64_t q_stride_b,
                           int64_t q_stride_h, const scalar_t* cache, const int64_t* tables,
                           const Plan& plan, int64_t group, int64_t kv_heads, int64_t num_slots,
                           int64_t max_blocks, int64_t block_size, float scale) {
  constexpr int64_t D = 8 * C;
  constexpr int CH = C < 8 ? C : 8;  // output accumulators in registers: D is done CH at a time
  static_assert(C % CH == 0);
  const int64_t G = group;
  const scalar_t* k_cache = cache;
  const scalar_t* v_cache = cache + kv_heads * num_slots * D;
  const int64_t pieces = static_cast<int64_t>(plan.pieces.size());
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), buf(block_size * D), row_max(G), row_sum(G);
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const Piece& pc = plan.pieces[work];
      const int64_t lo = pc.lo, hi = pc.hi, len = hi - lo;
      const PieceRows rows(pc, tables, max_blocks, num_slots, block_size, D);
      scaled_queries(qf.data(), q, q_stride_b, q_stride_h, pc, G, D, scale);
      scores.resize(G * len);
      // scores[g, l] = q_g . k_(lo + l), eight rows at a time (a block's last rows: the
      // missing ones repeat its last row, their lanes not stored)
      prefetch(k_cache + rows.at(lo), rows.span(lo) * D);
      for (int64_t pos = lo; pos < hi; pos += rows.span(pos)) {
        const int64_t n = rows.span(pos);
        rows.ask_next(k_cache, pos);
        const float* k = fp32_rows(k_cache + rows.at(pos), n, D, buf.data());
        for (int64_t i = 0; i < n; i += 8) {
          const float* kr[8];
          for (int r = 0; r < 8; ++r) {
            kr[r] = k + std::min<int64_t>(i + r, n - 1) * D;
          }
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            __m256 a[8];
            for (int r = 0; r < 8; ++r) {
              a[r] = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(kr[r]));
            }
            for (int c = 1; c < C; ++c) {
              const __m256 qc = _mm256_loadu_ps(qg + 8 * c);
              for (int r = 0; r < 8; ++r) {
                a[r] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[r] + 8 * c), a[r]);
              }
            }
            float* sg = scores.data() + g * len + pos - lo + i;
            if (n - i >= 8) {
              _mm256_storeu_ps(sg, hsum8(a));
            } else {
              alignas(32) float s[8];
              _mm256_store_ps(s, hsum8(a));
              std::copy(s, s + (n - i), sg);
            }
          }
        }
      }
      prefetch(v_cache + rows.at(lo), rows.span(lo) * D);
      softmax_rows(scores.data(), G, len, row_max.data(), row_sum.data());
      // acc[g] = sum_l p[g, l] v_(lo + l), in position order
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = lo; pos < hi; pos += rows.span(pos)) {
        const int64_t n = rows.span(pos);
        rows.ask_next(v_cache, pos);
        const float* v = fp32_rows(v_cache + rows.at(pos), n, D, buf.data());
        for (int64_t g = 0; g < G; ++g) {
          const float* pg = scores.data() + g * len + pos - lo;
          for (int c0 = 0; c0 < C; c0 += CH) {
            float* ag = acc.data() + g * D + 8 * c0;
            __m256 a[CH];
            for (int c = 0; c < CH; ++c) {
              a[c] = _mm256_loadu_ps(ag + 8 * c);
            }
            for (int64_t i = 0; i < n; ++i) {
              const __m256 p = _mm256_set1_ps(pg[i]);
              const float* vr = v + i * D + 8 * c0;
              for (int c = 0; c < CH; ++c) {
                a[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * c), a[c]);
              }
            }
            for (int c = 0; c < CH; ++c) {
              _mm256_storeu_ps(ag + 8 * c, a[c]);
            }
          }
        }
      }
      finish_piece(out, states, pc, G * kv_heads, G, D, acc.data(), row_max.data(),
                   row_sum.data());
    }
  });
}

// The AVX2 kernel for this head_dim, or nullptr.
template <typename scalar_t>
using Avx2Kernel = void (*)(scalar_t*, float*, const scalar_t*, int64_t, int64_t,
                            const scalar_t*, const int64_t*, const Plan&, int64_t, int64_t,
                            int64_t, int64_t, int64_t, float);

template <typename scalar_t>
Avx2Kernel<scalar_t> avx2_kernel(int64_t head_dim) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return nullptr;
  } else {
    switch (head_dim) {
      case 16: return decode_attention_avx2<scalar_t, 2>;
      case 32: return decode_attention_avx2<scalar_t, 4>;
      case 64: return decode_attention_avx2<scalar_t, 8>;
      case 128: return decode_attention_avx2<scalar_t, 16>;
      default: return nullptr;
    }
  }
}
#endif  // AVX2, FMA, F16C

#if defined(__AVX512F__)
#include <immintrin.h>

// The same attention with AVX-512 for head_dim = 16 * C and G query heads per KV head (the
// common shapes: C = 4 or 8, G <= 8): q, the output accumulators and a K/V row stay in
// registers (bf16 b32 decode on SmolLM2: 3.2 ms a step from cache against 8.3 for the plain
// loops). No software prefetch: asking for the next pair's rows made it slower here. The AVX2
// code above keeps the other shapes, the plain loops what neither takes.
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
void decode_attention_avx512(scalar_t* out, float* states, const scalar_t* q, int64_t q_stride_b,
                             int64_t q_stride_h, const scalar_t* cache, const int64_t* tables,
                             const Plan& plan, int64_t kv_heads, int64_t num_slots,
                             int64_t max_blocks, int64_t block_size, float scale) {
  constexpr int64_t D = 16 * C;
  const scalar_t* k_cache = cache;
  const scalar_t* v_cache = cache + kv_heads * num_slots * D;
  const int64_t pieces = static_cast<int64_t>(plan.pieces.size());
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const Piece& pc = plan.pieces[work];
      const int64_t lo = pc.lo, hi = pc.hi, len = hi - lo;
      const PieceRows rows(pc, tables, max_blocks, num_slots, block_size, D);
      __m512 qv[G][C];
      for (int g = 0; g < G; ++g) {
        const scalar_t* qh = q + pc.b * q_stride_b + (pc.kh * G + g) * q_stride_h;
        for (int c = 0; c < C; ++c) {
          qv[g][c] = _mm512_mul_ps(load16(qh + 16 * c), _mm512_set1_ps(scale));
        }
      }
      scores.resize(G * len);
      for (int64_t pos = lo; pos < hi; pos += rows.span(pos)) {
        const scalar_t* kb = k_cache + rows.at(pos);
        const int64_t n = rows.span(pos);
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
            scores[g * len + pos - lo + i] = _mm512_reduce_add_ps(s);
          }
        }
      }
      float row_max[G], row_sum[G];
      softmax_rows(scores.data(), G, len, row_max, row_sum);
      __m512 acc[G][C];
      for (int g = 0; g < G; ++g) {
        for (int c = 0; c < C; ++c) {
          acc[g][c] = _mm512_setzero_ps();
        }
      }
      for (int64_t pos = lo; pos < hi; pos += rows.span(pos)) {
        const scalar_t* vb = v_cache + rows.at(pos);
        const int64_t n = rows.span(pos);
        for (int64_t i = 0; i < n; ++i) {
          __m512 v[C];
          for (int c = 0; c < C; ++c) {
            v[c] = load16(vb + i * D + 16 * c);
          }
          for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * len + pos - lo + i]);
            for (int c = 0; c < C; ++c) {
              acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
            }
          }
        }
      }
      alignas(64) float sums[G * D];
      for (int g = 0; g < G; ++g) {
        for (int c = 0; c < C; ++c) {
          _mm512_store_ps(sums + g * D + 16 * c, acc[g][c]);
        }
      }
      finish_piece(out, states, pc, G * kv_heads, G, D, sums, row_max, row_sum);
    }
  });
}

// The AVX-512 kernel for this shape, or nullptr.
template <typename scalar_t>
using AttentionKernel = void (*)(scalar_t*, float*, const scalar_t*, int64_t, int64_t,
                                 const scalar_t*, const int64_t*, const Plan&, int64_t, int64_t,
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
  if constexpr (std::is_same_v<scalar_t, double>) {  // (else: no double kernels instantiated)
    return nullptr;
  } else {
    if (head_dim == 64) {
      return avx512_kernel_for_group<scalar_t, 4>(group);
    }
    if (head_dim == 128) {
      return avx512_kernel_for_group<scalar_t, 8>(group);
    }
    return nullptr;
  }
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
  const Plan plan = plan_pieces(lens, batch, kv_heads);
  const int64_t group = heads / kv_heads;
  std::vector<float> states(static_cast<size_t>(plan.states * group * (head_dim + 2)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
#if defined(__AVX512F__)
        if (const auto fast = avx512_kernel<scalar_t>(head_dim, group);
            fast != nullptr && !generic) {
          fast(o, states.data(), q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
               cache.data_ptr<scalar_t>(), tables, plan, kv_heads, num_slots, max_blocks,
               block_size, static_cast<float>(scale));
        } else
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        if (const auto avx2 = avx2_kernel<scalar_t>(head_dim); avx2 != nullptr && !generic) {
          avx2(o, states.data(), q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
               cache.data_ptr<scalar_t>(), tables, plan, group, kv_heads, num_slots, max_blocks,
               block_size, static_cast<float>(scale));
        } else
#endif
        {
          decode_attention_kernel<scalar_t>(
              o, states.data(), q.data_ptr<scalar_t>(), q.stride(0), q.stride(1),
              cache.data_ptr<scalar_t>(), tables, plan, heads, kv_heads, head_dim, num_slots,
              max_blocks, block_size, static_cast<float>(scale));
        }
        if (!plan.merges.empty()) {
          merge_splits(o, states.data(), plan, heads, group, head_dim);
        }
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
