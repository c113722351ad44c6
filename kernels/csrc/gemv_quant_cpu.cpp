// Weight-only int8 and int4 matrix-vector products: y[M, N] = x[M, K] @ dequant(W)[N, K]^T
// (+ bias), x and y bf16, fp32 accumulation, the weights read as stored (1 or 1/2 byte each).
//
// At decode batch sizes a matmul is a read of the weights (gemv_bf16_cpu.cpp's comment); int8
// halves the bytes of bf16 and int4 (group 32, fp32 scale and offset) reads 3/8 of them. With
// AVX-512 BF16 the weights are turned into bf16 in registers (exactly: every int8 and every
// 128 + u4 is a bf16) and multiplied with vdpbf16ps, as the bf16 kernel does; with AVX2 only,
// x is rounded to int16 in blocks with a power-of-two scale (run() says how closely) and
// multiplied with the weights as integers (vpmaddwd). The scales are applied per output. With
// AMX (run_amx) a full tile's weights become bf16 once a call and every 16 rows of x take tile
// multiplies against them: at 32 rows 2.5-3.5x the vector code's speed on an Intel Xeon (the
// vector code converts the weights again for every 8 rows), int8 1.35x and int4 0.89x at one
// row (a whole SmolLM2 pass, bench/README.md).
//
// int8, per-output-channel scale s[n]:  W[n, k] = s[n] * q[n, k],  q in -127..127
//     y = bf16(s[n] * sum_k q[n, k] x[k] + bias[n])
// int4, per (row, group of g columns) scale d and offset c:  W[n, k] = d * (128 + u) + c,
// u in 0..15 (c = min - 128 d, so that 128 + u, a bf16 with u in its mantissa, is the factor):
//     y = bf16(sum_groups (d * sum_{k in group} (128 + u) x[k] + c * sum_{k in group} x[k]) + b)
//
// Layouts (kernels/quant.py packs them), rows in tiles of TILE = 16 (the last one narrower,
// width w), each tile one contiguous stretch, read front to back:
//   int8 tile: w fp32 scales, then for each column pair kp the tile's rows' (q[n, 2kp],
//     q[n, 2kp+1]) side by side (2w bytes; an odd K gets a zero column). Tensor: int8
//     [N, 2 ceil(K/2) + 4] (the bytes a row owns), storage in tile order.
//   int4 tile: for each group j of g columns (K padded with zero columns to a multiple of g):
//     w fp32 d, w fp32 c, then g/4 chunks of 2w bytes; in chunk q, row i's bytes 2i and 2i+1
//     hold (u[4q] | u[4q+2] << 4) and (u[4q+1] | u[4q+3] << 4) of its group: zero-extended to
//     16-bit lanes, the low nibbles are the k-pairs (4q, 4q+1) of 16 rows and the high ones
//     (4q+2, 4q+3), vdpbf16ps's operand layout. Tensor: uint8 [N, ceil(K/g), g/2 + 8].
// x is zero-padded to the packed K, so padded columns add nothing whatever their weights.
//
// Each output is summed by one thread over all of K in a fixed order, whatever M or the thread
// count, from its own row of x alone: a row's result does not depend on the batch (on AMX CPUs
// every M takes the tile code for full tiles, whose sums within an instruction round
// otherwise). The plain loops (other CPUs, `generic`) compute the same sums in fp32 in another
// order (within fp32 rounding of the AVX-512 code, and of the AVX2 code's rounding of x; not
// bit equal).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "amx.h"
#include "checks.h"
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace peftserve_cpu {

namespace {

constexpr int64_t TILE = 16;      // rows of W per tile
constexpr int64_t MAX_GROUP = 8;  // rows of x summed together over one pass of a tile
constexpr int64_t XBLOCK = 32;    // int8: columns of x per int16 scale (int4: the group)

struct QProblem {
  const uint8_t* w;    // tiles
  const float* xf;     // [M, Kpad] x as fp32, zero-padded
  const uint32_t* xp;  // [M, Kpad / 2] x's bf16 pairs
  const float* xg;     // [M, groups] sum of x over each int4 group (int4 only)
  const uint32_t* xi;  // [M, Kx / 2] x's int16 pairs (the AVX2 code only)
  const float* xs;     // [M, blocks] the scale of each block of xi
  const float* bias;   // [N] fp32 or null
  uint16_t* y;         // [M, N] bf16, row stride ldy
  int64_t M, N, Kpad, groups, group, ldy, Kx, blocks;
  bool int4;
};

inline void store_row(const QProblem& p, int64_t m, int64_t n0, int64_t width, const float* acc) {
  uint16_t* out = p.y + m * p.ldy + n0;
  for (int64_t i = 0; i < width; ++i) {
    out[i] = bf16_bits(acc[i] + (p.bias != nullptr ? p.bias[n0 + i] : 0.f));
  }
}

inline float load_f32(const uint8_t* at) {
  float v;
  std::memcpy(&v, at, sizeof(v));
  return v;
}

// Plain loops over rows m0..m0+g of one tile (t: its first byte, width rows).
void tile_generic(const QProblem& p, const uint8_t* t, int64_t n0, int64_t width, int64_t m0,
                  int64_t g) {
  const int64_t Kp = p.Kpad / 2;
  for (int64_t m = m0; m < m0 + g; ++m) {
    const float* x = p.xf + m * p.Kpad;
    float acc[TILE] = {};
    if (!p.int4) {
      const auto* q = reinterpret_cast<const int8_t*>(t + 4 * width);
      for (int64_t kp = 0; kp < Kp; ++kp) {
        for (int64_t i = 0; i < width; ++i) {
          acc[i] += static_cast<float>(q[(kp * width + i) * 2]) * x[2 * kp] +
                    static_cast<float>(q[(kp * width + i) * 2 + 1]) * x[2 * kp + 1];
        }
      }
      for (int64_t i = 0; i < width; ++i) {
        acc[i] *= load_f32(t + 4 * i);
      }
    } else {
      const int64_t block = width * (8 + p.group / 2);
      for (int64_t j = 0; j < p.groups; ++j) {
        const uint8_t* b = t + j * block;
        const uint8_t* chunks = b + 8 * width;
        const float* xj = x + j * p.group;
        for (int64_t i = 0; i < width; ++i) {
          float dot = 0.f;
          for (int64_t q = 0; q < p.group / 4; ++q) {
            const uint8_t b0 = chunks[(q * width + i) * 2], b1 = chunks[(q * width + i) * 2 + 1];
            dot += static_cast<float>(128 + (b0 & 15)) * xj[4 * q] +
                   static_cast<float>(128 + (b1 & 15)) * xj[4 * q + 1] +
                   static_cast<float>(128 + (b0 >> 4)) * xj[4 * q + 2] +
                   static_cast<float>(128 + (b1 >> 4)) * xj[4 * q + 3];
          }
          acc[i] = std::fma(dot, load_f32(b + 4 * i), acc[i]);
          acc[i] = std::fma(p.xg[m * p.groups + j], load_f32(b + 4 * (width + i)), acc[i]);
        }
      }
    }
    store_row(p, m, n0, width, acc);
  }
}

#if defined(__AVX512BF16__)
// The weights into bf16, exactly, as the vector code and the AMX code (amx_dequant_*) read them.
// int8: 16 rows' k-pairs (32 bytes) -> int32 -> fp32 -> one bf16 vector, vdpbf16ps's operand.
inline __attribute__((always_inline)) __m512bh int8_pairs_bf16(__m256i b) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// int4: 16 rows x 4 columns (32 bytes, zero-extended to 16-bit lanes) -> the k-pairs 2q (low
// nibbles) and 2q + 1 (high nibbles) as 128 + u, by OR-ing 0x4300 (128.0) into the nibbles.
inline __attribute__((always_inline)) void int4_nibbles_bf16(__m512i v, __m512bh& lo,
                                                              __m512bh& hi) {
  const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  lo = (__m512bh)_mm512_ternarylogic_epi32(v, low, magic, 0xEA);
  hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
}

// int8: int8_pairs_bf16, then one vdpbf16ps per row of x; the scale multiplies the sum once.
template <size_t... g>
void tile_int8(std::index_sequence<g...>, const QProblem& p, const uint8_t* t, int64_t n0,
               int64_t width, int64_t m0) {
  constexpr size_t G = sizeof...(g);
  const __mmask32 bytes = width >= 16 ? ~__mmask32(0) : __mmask32((1u << (2 * width)) - 1);
  const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
  const int64_t Kp = p.Kpad / 2, step = 2 * width;
  const int32_t* x = reinterpret_cast<const int32_t*>(p.xp + m0 * Kp);
  const uint8_t* q = t + 4 * width;
  __m512 acc[G] = {(static_cast<void>(g), _mm512_setzero_ps())...};
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const __m512bh wv = int8_pairs_bf16(_mm256_maskz_loadu_epi8(bytes, q + kp * step));
    ((acc[g] = _mm512_dpbf16_ps(acc[g], wv, (__m512bh)_mm512_set1_epi32(x[g * Kp + kp]))), ...);
  }
  const __m512 s = _mm512_maskz_loadu_ps(lanes, t);
  alignas(64) float out[G][TILE];
  (_mm512_store_ps(out[g], _mm512_mul_ps(acc[g], s)), ...);
  (store_row(p, m0 + static_cast<int64_t>(g), n0, width, out[g]), ...);
}

// int4: int4_nibbles_bf16, two vdpbf16ps per row of x; per group, acc += d * dot + c * sum(x).
template <size_t... g>
void tile_int4(std::index_sequence<g...>, const QProblem& p, const uint8_t* t, int64_t n0,
               int64_t width, int64_t m0) {
  constexpr size_t G = sizeof...(g);
  const __mmask32 bytes = width >= 16 ? ~__mmask32(0) : __mmask32((1u << (2 * width)) - 1);
  const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
  const int64_t Kp = p.Kpad / 2, step = 2 * width, block = width * (8 + p.group / 2);
  const int64_t chunks = p.group / 4;
  const int32_t* x = reinterpret_cast<const int32_t*>(p.xp + m0 * Kp);
  const float* xg = p.xg + m0 * p.groups;
  __m512 acc[G] = {(static_cast<void>(g), _mm512_setzero_ps())...};
  for (int64_t j = 0; j < p.groups; ++j) {
    const uint8_t* b = t + j * block;
    const uint8_t* c = b + 8 * width;
    const int32_t* xj = x + j * (p.group / 2);
    __m512 dot[G] = {(static_cast<void>(g), _mm512_setzero_ps())...};
    for (int64_t q = 0; q < chunks; ++q) {
      __m512bh lo, hi;
      int4_nibbles_bf16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(bytes, c + q * step)), lo,
                        hi);
      ((dot[g] = _mm512_dpbf16_ps(dot[g], lo, (__m512bh)_mm512_set1_epi32(xj[g * Kp + 2 * q])),
        dot[g] = _mm512_dpbf16_ps(dot[g], hi, (__m512bh)_mm512_set1_epi32(xj[g * Kp + 2 * q + 1]))),
       ...);
    }
    const __m512 d = _mm512_maskz_loadu_ps(lanes, b);
    const __m512 off = _mm512_maskz_loadu_ps(lanes, b + 4 * width);
    ((acc[g] = _mm512_fmadd_ps(dot[g], d, acc[g]),
      acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(xg[g * p.groups + j]), off, acc[g])),
     ...);
  }
  alignas(64) float out[G][TILE];
  (_mm512_store_ps(out[g], acc[g]), ...);
  (store_row(p, m0 + static_cast<int64_t>(g), n0, width, out[g]), ...);
}
#elif defined(__AVX2__)
// AVX2 (no AVX-512 BF16): integer dot products, vpmaddwd (16 int16 products, summed in pairs
// into int32) on the weights widened to 16-bit lanes and x rounded to int16 (run() below: in
// blocks of XBLOCK columns, the int4 group, each with a power-of-two scale). A block's sums are
// exact in int32; each is turned into fp32 and scaled once. A ymm register holds 8 rows of W (a
// slab; a full tile has 2); partial tiles take the plain loops. The k-pair 1024 bytes ahead is
// prefetched, as in gemv_bf16_cpu.cpp's AVX2 code. (Turning every weight into fp32 for FMAs,
// the AVX-512 code's sums in its order, took more instructions than the read allowed:
// bench/README.md has both codes' times.)
constexpr int64_t AVX2_PREFETCH = 1024;
constexpr int64_t AVX2_ROWS = 2;  // rows of x a pass over a tile (16 ymm registers)

// int8, G <= 2 rows of x, both slabs: per k-pair, 16 bytes a slab sign-extended to 16-bit lanes
// (row i's q[n, 2kp], q[n, 2kp + 1] side by side) times x's int16 pair; per block, acc += fp32
// sum * x's block scale; the channel scale multiplies the total once.
template <size_t... g>
void tile_int8_avx2(std::index_sequence<g...>, const QProblem& p, const uint8_t* t, int64_t n0,
                    int64_t m0) {
  constexpr size_t G = sizeof...(g);
  constexpr int64_t PAIRS = XBLOCK / 2;
  const int64_t Kp = p.Kpad / 2, lx = p.Kx / 2;
  const auto* x = reinterpret_cast<const int32_t*>(p.xi) + m0 * lx;
  const float* xs = p.xs + m0 * p.blocks;
  const uint8_t* q = t + 4 * TILE;
  __m256 acc[2][G];
  ((acc[0][g] = _mm256_setzero_ps(), acc[1][g] = _mm256_setzero_ps()), ...);
  for (int64_t b = 0; b < p.blocks; ++b) {
    __m256i sum[2][G], xv[G];
    __m256 sv[G];
    ((sum[0][g] = _mm256_setzero_si256(), sum[1][g] = _mm256_setzero_si256()), ...);
    for (int64_t kp = b * PAIRS, end = std::min(Kp, kp + PAIRS); kp < end; ++kp) {
      const uint8_t* qk = q + kp * 2 * TILE;
      _mm_prefetch(reinterpret_cast<const char*>(qk) + AVX2_PREFETCH, _MM_HINT_T0);
      const auto* qv = reinterpret_cast<const __m128i*>(qk);
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(qv));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(qv + 1));
      ((xv[g] = _mm256_set1_epi32(x[g * lx + kp]),
        sum[0][g] = _mm256_add_epi32(sum[0][g], _mm256_madd_epi16(w0, xv[g])),
        sum[1][g] = _mm256_add_epi32(sum[1][g], _mm256_madd_epi16(w1, xv[g]))),
       ...);
    }
    ((sv[g] = _mm256_set1_ps(xs[g * p.blocks + b]),
      acc[0][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[0][g]), sv[g], acc[0][g]),
      acc[1][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[1][g]), sv[g], acc[1][g])),
     ...);
  }
  const auto* scale = reinterpret_cast<const float*>(t);
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  alignas(32) float out[G][TILE];
  ((_mm256_store_ps(out[g], _mm256_mul_ps(acc[0][g], s0)),
    _mm256_store_ps(out[g] + 8, _mm256_mul_ps(acc[1][g], s1))),
   ...);
  (store_row(p, m0 + static_cast<int64_t>(g), n0, TILE, out[g]), ...);
}

// int4, G <= 2 rows of x, both slabs: a slab's chunk (16 bytes: 8 rows x 4 nibbles) zero-extended
// to 16-bit lanes; the low nibbles are row i's u at k = 4q, 4q + 1, the high ones at 4q + 2,
// 4q + 3: two vpmaddwd with x's int16 pairs. Per group (x's block), with W = d u + m and
// m = 128 d + c (the layout's offset is for 128 + u): acc += d * (fp32 sum * x's scale) +
// m * sum(x).
template <size_t... g>
void tile_int4_avx2(std::index_sequence<g...>, const QProblem& p, const uint8_t* t, int64_t n0,
                    int64_t m0) {
  constexpr size_t G = sizeof...(g);
  const int64_t block = TILE * (8 + p.group / 2), step = 2 * TILE, lx = p.Kx / 2;
  const auto* x = reinterpret_cast<const int32_t*>(p.xi) + m0 * lx;
  const float* xs = p.xs + m0 * p.blocks;
  const float* xg = p.xg + m0 * p.groups;
  const __m256i low = _mm256_set1_epi16(0x000F);
  __m256 acc[2][G];
  ((acc[0][g] = _mm256_setzero_ps(), acc[1][g] = _mm256_setzero_ps()), ...);
  for (int64_t j = 0; j < p.groups; ++j) {
    const uint8_t* c = t + j * block + 8 * TILE;
    const int32_t* xj = x + j * (p.group / 2);
    __m256i sum[2][G];
    ((sum[0][g] = _mm256_setzero_si256(), sum[1][g] = _mm256_setzero_si256()), ...);
    for (int64_t q = 0; q < p.group / 4; ++q) {
      const uint8_t* cq = c + q * step;
      _mm_prefetch(reinterpret_cast<const char*>(cq) + AVX2_PREFETCH, _MM_HINT_T0);
      for (int64_t h = 0; h < 2; ++h) {
        const __m256i v =
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cq + 16 * h)));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_srli_epi16(v, 4);
        const int32_t* xq = xj + 2 * q;
        ((sum[h][g] = _mm256_add_epi32(sum[h][g],
                                       _mm256_madd_epi16(lo, _mm256_set1_epi32(xq[g * lx]))),
          sum[h][g] = _mm256_add_epi32(sum[h][g],
                                       _mm256_madd_epi16(hi, _mm256_set1_epi32(xq[g * lx + 1])))),
         ...);
      }
    }
    const auto* d = reinterpret_cast<const float*>(t + j * block);
    __m256 dot[G];
    for (int64_t h = 0; h < 2; ++h) {
      const __m256 dh = _mm256_loadu_ps(d + 8 * h);
      const __m256 ch = _mm256_loadu_ps(d + TILE + 8 * h);
      const __m256 mh = _mm256_fmadd_ps(_mm256_set1_ps(128.f), dh, ch);
      ((dot[g] = _mm256_mul_ps(_mm256_cvtepi32_ps(sum[h][g]), _mm256_set1_ps(xs[g * p.blocks + j])),
        acc[h][g] = _mm256_fmadd_ps(dot[g], dh, acc[h][g]),
        acc[h][g] = _mm256_fmadd_ps(_mm256_set1_ps(xg[g * p.groups + j]), mh, acc[h][g])),
       ...);
    }
  }
  alignas(32) float out[G][TILE];
  ((_mm256_store_ps(out[g], acc[0][g]), _mm256_store_ps(out[g] + 8, acc[1][g])), ...);
  (store_row(p, m0 + static_cast<int64_t>(g), n0, TILE, out[g]), ...);
}

// Rows of x in passes of AVX2_ROWS over a full tile (re-read from the L1 cache).
void tile_rows_avx2(const QProblem& p, const uint8_t* t, int64_t n0, int64_t m0, int64_t g) {
  for (int64_t m = m0; m < m0 + g; m += AVX2_ROWS) {
    if (m + 1 == m0 + g) {
      p.int4 ? tile_int4_avx2(std::make_index_sequence<1>(), p, t, n0, m)
             : tile_int8_avx2(std::make_index_sequence<1>(), p, t, n0, m);
    } else {
      p.int4 ? tile_int4_avx2(std::make_index_sequence<2>(), p, t, n0, m)
             : tile_int8_avx2(std::make_index_sequence<2>(), p, t, n0, m);
    }
  }
}
#endif

void tile_rows(const QProblem& p, const uint8_t* t, int64_t n0, int64_t width, int64_t m0,
               int64_t g, bool generic) {
#if defined(__AVX512BF16__)
  if (!generic) {
#define PEFTSERVE_QTILE(G)                                                       \
  return p.int4 ? tile_int4(std::make_index_sequence<G>(), p, t, n0, width, m0) \
                : tile_int8(std::make_index_sequence<G>(), p, t, n0, width, m0)
    switch (g) {
      case 1: PEFTSERVE_QTILE(1);
      case 2: PEFTSERVE_QTILE(2);
      case 3: PEFTSERVE_QTILE(3);
      case 4: PEFTSERVE_QTILE(4);
      case 5: PEFTSERVE_QTILE(5);
      case 6: PEFTSERVE_QTILE(6);
      case 7: PEFTSERVE_QTILE(7);
      default: PEFTSERVE_QTILE(8);
    }
#undef PEFTSERVE_QTILE
  }
#elif defined(__AVX2__)
  if (!generic && width == TILE) {
    tile_rows_avx2(p, t, n0, m0, g);
    return;
  }
#endif
  static_cast<void>(generic);
  tile_generic(p, t, n0, width, m0, g);
}

#if defined(PEFTSERVE_AMX)
// AMX (gemv_bf16_cpu.cpp's comment): a full tile's weights turned into bf16 once a call, exactly
// as the vector code turns them, into tdpbf16ps's B layout (a k-pair's 16 rows side by side, 64
// bytes), then 16 rows of x at a time against them. int8: the channel scale multiplies the sum;
// int4: per group (16, 32 or 64 k-pairs, whole tile instructions), acc += d * dot + c * sum(x),
// as the vector code. Every M, every full tile; the narrower last tile keeps the vector code.
// int8 k-pairs kp0..kp1 of tile t as bf16 B rows from dst (k-pair kp0's) on.
void amx_dequant_int8(const uint8_t* t, int64_t kp0, int64_t kp1, uint16_t* dst) {
  const uint8_t* q = t + 4 * TILE;
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + kp * 2 * TILE));
    _mm512_store_si512(dst + (kp - kp0) * 2 * TILE, (__m512i)int8_pairs_bf16(v));
  }
}

// int4 groups j0..j1 of tile t as bf16 B rows from dst (group j0's first k-pair) on.
void amx_dequant_int4(const QProblem& p, const uint8_t* t, int64_t j0, int64_t j1, uint16_t* dst) {
  const int64_t block = TILE * (8 + p.group / 2);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* c = t + j * block + 8 * TILE;
    uint16_t* bj = dst + (j - j0) * (p.group / 2) * 2 * TILE;
    for (int64_t q = 0; q < p.group / 4; ++q) {
      __m512bh lo, hi;
      int4_nibbles_bf16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(c + q * 2 * TILE))),
                        lo, hi);
      _mm512_store_si512(bj + 2 * q * 2 * TILE, (__m512i)lo);
      _mm512_store_si512(bj + (2 * q + 1) * 2 * TILE, (__m512i)hi);
    }
  }
}

// The tile's weights as bf16 B rows: b[kp][16 rows][2].
void amx_dequant(const QProblem& p, const uint8_t* t, uint16_t* b) {
  const int64_t Kp = p.Kpad / 2;
  if (p.int4) {
    amx_dequant_int4(p, t, 0, p.groups, b);
  } else {
    amx_dequant_int8(t, 0, Kp, b);
  }
}

// Tiles 0 (and int4's 1): the accumulators; 2-3 (4 and 7): A and B over 16 k-pairs; 5-6: A
// and B over int8's Kp % 16 last k-pairs.
TileConfig amx_qconfig(int64_t rows, int64_t tail, bool int4) {
  TileConfig c;
  c.set(0, rows, 64);
  c.set(2, rows, 64);
  c.set(3, AMX_ROWS, 64);
  if (int4) {
    c.set(1, rows, 64);
    c.set(4, rows, 64);
    c.set(7, AMX_ROWS, 64);
  }
  if (tail > 0) {
    c.set(5, rows, 4 * tail);
    c.set(6, tail, 64);
  }
  return c;
}

// How far ahead of the weights being turned into bf16 the 16-rows-or-fewer path prefetches
// (b null in amx_qtile): a burst of conversions, then tile instructions that keep later loads
// from running ahead (gemv_bf16_cpu.cpp's AMX_PREFETCH), so without prefetches the weights'
// read stalls between bursts. A SmolLM2 decode step at one row (Intel Xeon, 2 threads, the
// distances alternated request by request in one process, 8-10 rounds): int8 0.71x the step's
// time without at 2 KB ahead (512 B 0.75x, 1 KB 0.72x, 3 KB 0.72x, 4 KB 0.74x); int4 0.69-0.72x
// at 3-8 KB (1 KB 0.82x, 2 KB 0.75x).
constexpr int64_t AMX_PREFETCH_INT8 = 2048, AMX_PREFETCH_INT4 = 4096;

// Rows m0..m0+rows of one full tile t, its weights already in b.
void amx_qtile(const QProblem& p, const uint8_t* t, const uint16_t* b, int64_t n0, int64_t m0,
               int64_t rows) {
  const int64_t Kp = p.Kpad / 2, live = std::min(rows, p.M - m0);
  const uint32_t* x = p.xp + m0 * Kp;
  alignas(64) float out[AMX_ROWS][TILE];
  // b null (16 rows of x or fewer: the weights are read once): NEAR k-pairs at a time are
  // turned into bf16 just before their tile loads, into 4-8 KB that stay in L1 (a whole tile
  // of SmolLM2's down projection is 48 KB, L1's size: one row's pass 1.1-1.2x as long).
  constexpr int64_t NEAR = 4 * AMX_ROWS;
  alignas(64) uint16_t near[2 * 64 * 2 * TILE];  // NEAR k-pairs; int4: two groups of <= 128
  if (!p.int4) {
    const int64_t full = Kp - Kp % AMX_ROWS;
    _tile_zero(0);
    for (int64_t k0 = 0; k0 < full; k0 += AMX_ROWS) {
      const uint16_t* bk = b + k0 * 2 * TILE;
      if (b == nullptr) {
        if (k0 % NEAR == 0) {
          prefetch_ahead(t + 4 * TILE + k0 * 2 * TILE, AMX_PREFETCH_INT8, NEAR * 2 * TILE);
          amx_dequant_int8(t, k0, std::min(Kp, k0 + NEAR), near);
        }
        bk = near + (k0 % NEAR) * 2 * TILE;
      }
      _tile_loadd(2, x + k0, Kp * 4);
      _tile_loadd(3, bk, 2 * TILE * 2);
      _tile_dpbf16ps(0, 2, 3);
    }
    if (full < Kp) {
      const uint16_t* bk = b + full * 2 * TILE;
      if (b == nullptr) {
        if (full % NEAR == 0) {
          amx_dequant_int8(t, full, Kp, near);
        }
        bk = near + (full % NEAR) * 2 * TILE;
      }
      _tile_loadd(5, x + full, Kp * 4);
      _tile_loadd(6, bk, 2 * TILE * 2);
      _tile_dpbf16ps(0, 5, 6);
    }
    _tile_stored(0, out[0], TILE * 4);
    const __m512 s = _mm512_loadu_ps(t);
    for (int64_t r = 0; r < live; ++r) {
      _mm512_store_ps(out[r], _mm512_mul_ps(_mm512_load_ps(out[r]), s));
      store_row(p, m0 + r, n0, TILE, out[r]);
    }
    return;
  }
  // Two groups at a time into two accumulator tiles (0 and 1; A and B in 2-3 and 4-7): their
  // instructions overlap. The groups' sums are added in order: acc += d * dot + c * sum(x).
  const int64_t block = TILE * (8 + p.group / 2), per_group = p.group / 2;
  alignas(64) float dots[2][AMX_ROWS][TILE];
  __m512 acc[AMX_ROWS];
  for (int64_t r = 0; r < live; ++r) {
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < p.groups; j += 2) {
    const bool pair = j + 1 < p.groups;
    const uint16_t* bj = b + j * per_group * 2 * TILE;
    if (b == nullptr) {
      prefetch_ahead(t + j * block, AMX_PREFETCH_INT4, 2 * block);
      amx_dequant_int4(p, t, j, pair ? j + 2 : j + 1, near);
      bj = near;
    }
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k0 = 0; k0 < per_group; k0 += AMX_ROWS) {
      _tile_loadd(2, x + j * per_group + k0, Kp * 4);
      _tile_loadd(3, bj + k0 * 2 * TILE, 2 * TILE * 2);
      _tile_dpbf16ps(0, 2, 3);
      if (pair) {
        const int64_t k1 = k0 + per_group;
        _tile_loadd(4, x + j * per_group + k1, Kp * 4);
        _tile_loadd(7, bj + k1 * 2 * TILE, 2 * TILE * 2);
        _tile_dpbf16ps(1, 4, 7);
      }
    }
    _tile_stored(0, dots[0][0], TILE * 4);
    _tile_stored(1, dots[1][0], TILE * 4);
    for (int64_t h = 0; h < (pair ? 2 : 1); ++h) {
      const uint8_t* scales = t + (j + h) * block;
      const __m512 d = _mm512_loadu_ps(scales), off = _mm512_loadu_ps(scales + 4 * TILE);
      const float* xg = p.xg + m0 * p.groups + j + h;
      for (int64_t r = 0; r < live; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_load_ps(dots[h][r]), d, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xg[r * p.groups]), off, acc[r]);
      }
    }
  }
  for (int64_t r = 0; r < live; ++r) {
    _mm512_store_ps(out[r], acc[r]);
    store_row(p, m0 + r, n0, TILE, out[r]);
  }
}

// The whole call on AMX: full tiles' weights into bf16 once, then every 16 rows of x.
void run_amx(const QProblem& p, int64_t row_bytes, int64_t tiles) {
  const int64_t rows = std::min(p.M, AMX_ROWS), Kp = p.Kpad / 2;
  const TileConfig cfg = amx_qconfig(rows, p.int4 ? 0 : Kp % AMX_ROWS, p.int4);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    // A whole tile's weights in bf16 (64 bytes a k-pair), for more than 16 rows of x only.
    std::vector<__m512i> scratch(p.M > AMX_ROWS ? static_cast<size_t>(Kp) : 0);
    auto* b = reinterpret_cast<uint16_t*>(scratch.data());
    _tile_loadconfig(&cfg);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE, width = std::min(TILE, p.N - n0);
      const uint8_t* tile = p.w + n0 * row_bytes;
      if (width < TILE) {
        for (int64_t m = 0; m < p.M; m += MAX_GROUP) {
          tile_rows(p, tile, n0, width, m, std::min(MAX_GROUP, p.M - m), false);
        }
        continue;
      }
      if (p.M <= AMX_ROWS) {
        amx_qtile(p, tile, nullptr, n0, 0, rows);
        continue;
      }
      amx_dequant(p, tile, b);
      for (int64_t m = 0; m < p.M; m += AMX_ROWS) {
        amx_qtile(p, tile, b, n0, m, rows);
      }
    }
    _tile_release();
  });
}
#endif

void check_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                const std::optional<at::Tensor>& bias, const char* op) {
  check_dense_cpu(out, op, "out");
  check_dense_cpu(x, op, "x");
  check_dense_cpu(w, op, "w");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16, op,
              ": out and x must be bfloat16, got ", out.scalar_type(), ", ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), op,
              ": x must be [M, K] with contiguous rows, got sizes ", x.sizes(), " strides ",
              x.strides());
  TORCH_CHECK(w.is_contiguous() && w.size(0) >= 0, op, ": w must be contiguous");
  check_linear_out(out, x, w.size(0), bias, op);
}

void run(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
         const std::optional<at::Tensor>& bias, bool generic, bool amx, bool int4,
         int64_t groups, int64_t group, int64_t Kpad) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (M == 0 || N == 0) {
    return;
  }
  const bool on_amx = amx && !generic && amx_available();
  // AMX's A tiles read 16 rows at a time beyond 16 rows: x's pairs padded with zero rows.
  const int64_t x_rows = amx_x_rows(M, on_amx);
  // x once in the forms the code reads, zero-padded: fp32 (the plain loops), bf16 pairs (the
  // AVX-512 code), int16 pairs with a scale per block (the AVX2 code, below), and for int4 its
  // per-group sums; copied before out is written, so out may alias x. Rows in parallel where
  // there are many (prefill).
#if defined(__AVX512BF16__)
  const bool pairs = !generic, ints = false;
#elif defined(__AVX2__)
  const bool pairs = false, ints = !generic;
#else
  const bool pairs = false, ints = false;
#endif
  // The AVX2 code's x: int16 in blocks (int4: the group, int8: XBLOCK columns), each with the
  // scale 2^(e - 14), e the exponent of the block's largest |x|: every value within 2^7 of the
  // largest is exact (bf16 has 8 significant bits), smaller ones are rounded to a multiple of
  // the scale (at most 2^-15 of the largest), and |x| / scale < 2^15. A block with an infinite
  // or NaN x gets a NaN scale (its outputs are NaN).
  const int64_t xblock = int4 ? group : XBLOCK;
  const int64_t blocks = (Kpad + xblock - 1) / xblock, Kx = blocks * xblock;
  std::vector<float> xf(static_cast<size_t>(M * Kpad), 0.f);
  std::vector<uint32_t> xp(pairs ? static_cast<size_t>(x_rows * Kpad / 2) : 0, 0u);
  std::vector<float> xg(int4 ? static_cast<size_t>(M * groups) : 0, 0.f);
  std::vector<uint32_t> xi(ints ? static_cast<size_t>(M * Kx / 2) : 0, 0u);
  std::vector<float> xsc(ints ? static_cast<size_t>(M * blocks) : 0, 0.f);
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t m0,
                                                                                  int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* row = xs + m * x.stride(0);
      float* f = xf.data() + m * Kpad;
      for (int64_t k = 0; k < K; ++k) {
        f[k] = bf16_value(row[k]);
      }
      if (pairs) {  // little-endian: the pair (x[2i], x[2i + 1]) is the 32-bit word i
        std::memcpy(xp.data() + m * Kpad / 2, row, static_cast<size_t>(2 * K));
      }
      for (int64_t j = 0; int4 && j < groups; ++j) {
        float sum = 0.f;
        for (int64_t k = j * group; k < std::min(K, (j + 1) * group); ++k) {
          sum += f[k];
        }
        xg[m * groups + j] = sum;
      }
      for (int64_t b = 0; ints && b < blocks; ++b) {
        const int64_t k0 = b * xblock, k1 = std::min(K, k0 + xblock);
        int e = 1;  // biased; 1 for blocks of zeros and subnormals
        for (int64_t k = k0; k < k1; ++k) {
          e = std::max(e, (row[k] >> 7) & 0xFF);
        }
        if (e == 0xFF) {
          xsc[m * blocks + b] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        xsc[m * blocks + b] = std::ldexp(1.f, e - 141);
        int16_t q[128];  // xblock <= 128
        if (e >= 15) {  // x * 2^(141 - e) as one multiply: 2^(141 - e) is a float
          const float by = std::ldexp(1.f, 141 - e);
          for (int64_t k = k0; k < k1; ++k) {
            q[k - k0] = static_cast<int16_t>(std::lrintf(f[k] * by));
          }
        } else {
          for (int64_t k = k0; k < k1; ++k) {
            q[k - k0] = static_cast<int16_t>(std::lrintf(std::ldexp(f[k], 141 - e)));
          }
        }
        std::memcpy(reinterpret_cast<char*>(xi.data()) + 2 * (m * Kx + k0), q,
                    static_cast<size_t>(2 * (k1 - k0)));
      }
    }
  });
  std::vector<float> bf;
  if (bias.has_value()) {
    const auto* b = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
    bf.resize(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      bf[n] = bf16_value(b[n]);
    }
  }
  const QProblem p{static_cast<const uint8_t*>(w.data_ptr()),
                   xf.data(),
                   xp.data(),
                   xg.data(),
                   xi.data(),
                   xsc.data(),
                   bias.has_value() ? bf.data() : nullptr,
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()),
                   M,
                   N,
                   Kpad,
                   groups,
                   group,
                   out.stride(0),
                   Kx,
                   blocks,
                   int4};
  const int64_t row_bytes = w.numel() / N;  // every earlier tile is full
  const int64_t tiles = (N + TILE - 1) / TILE;
#if defined(PEFTSERVE_AMX)
  if (on_amx) {
    run_amx(p, row_bytes, tiles);
    return;
  }
#endif
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE, width = std::min(TILE, N - n0);
      const uint8_t* tile = p.w + n0 * row_bytes;
      for (int64_t m = 0; m < M; m += MAX_GROUP) {
        tile_rows(p, tile, n0, width, m, std::min(MAX_GROUP, M - m), generic);
      }
    }
  });
}

}  // namespace

void gemv_int8(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
               const std::optional<at::Tensor>& bias, bool generic, bool amx) {
  constexpr const char* op = "gemv_int8";
  check_args(out, x, w, bias, op);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, op,
              ": w must be an int8 [N, 2 ceil(K/2) + 4] tensor from kernels/quant.py, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t Kp = (x.size(1) + 1) / 2;
  TORCH_CHECK(w.size(1) == 2 * Kp + 4, op, ": w packs rows of ", w.size(1),
              " bytes, x's K = ", x.size(1), " needs ", 2 * Kp + 4);
  run(out, x, w, bias, generic, amx, false, 1, 1, 2 * Kp);
}

void gemv_int4(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
               const std::optional<at::Tensor>& bias, bool generic, bool amx) {
  constexpr const char* op = "gemv_int4";
  check_args(out, x, w, bias, op);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3, op,
              ": w must be a uint8 [N, ceil(K/g), g/2 + 8] tensor from kernels/quant.py, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t group = (w.size(2) - 8) * 2;
  TORCH_CHECK(group == 32 || group == 64 || group == 128, op,
              ": the group size must be 32, 64 or 128, w's last dimension says ", group);
  const int64_t groups = (x.size(1) + group - 1) / group;
  TORCH_CHECK(w.size(1) == groups, op, ": w has ", w.size(1), " groups of ", group,
              " columns, x's K = ", x.size(1), " needs ", groups);
  run(out, x, w, bias, generic, amx, true, groups, group, groups * group);
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def("gemv_int8(Tensor(a!) out, Tensor x, Tensor w, Tensor? bias, bool generic=False, "
        "bool amx=True) -> ()");
  m.def("gemv_int4(Tensor(a!) out, Tensor x, Tensor w, Tensor? bias, bool generic=False, "
        "bool amx=True) -> ()");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("gemv_int8", &peftserve_cpu::gemv_int8);
  m.impl("gemv_int4", &peftserve_cpu::gemv_int4);
}
