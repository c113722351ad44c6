// bf16 matrix-vector products for small batches: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), fp32
// accumulation, from weights laid out once for streaming.
//
// At decode batch sizes a matmul is a read of the weights: SmolLM2-135M's 270 MB take ~9 ms to
// read on this machine's 2 cores, while oneDNN's bf16 matmul at batch 1 took ~15 ms. This
// kernel reads each weight once per call, in one contiguous stream per thread, which the
// hardware prefetcher follows: software prefetches 512 B to 4 KB ahead made a 226 MB pass
// 10-70% slower on Zen 4 (2 threads, the AVX-512 BF16 code), so that code has none; the AVX2
// code, slower per byte, gains from them (AVX2_PREFETCH).
//
// Layout (kernels/gemv.py packs it): W's rows in tiles of TILE = 32 (the last tile narrower
// when N % 32 != 0); within a tile, for each pair of columns kp = 0 .. ceil(K/2)-1, the tile's
// rows' two bf16 values W[n, 2kp], W[n, 2kp+1] side by side (a zero pads an odd K). One k-pair
// of a full tile is 128 bytes: two 512-bit loads, each the operand of one vdpbf16ps. The tensor
// is [N, ceil(K/2), 2] bf16 but its storage is in that order, not W[n, kp, j]'s.
//
// Every output is the same sum in every path and at every batch size:
//     acc = 0; for kp: acc += W[n,2kp+1] * x[2kp+1]; acc += W[n,2kp] * x[2kp]   (fp32)
//     y = bf16(acc + bias[n])     (round to nearest even)
// which is vdpbf16ps's order. Products of two bf16 values are exact in fp32, so an FMA, a
// multiply then an add, and vdpbf16ps all round the same; only vdpbf16ps flushes denormal
// inputs and outputs to zero. A row's result never depends on M or on the thread count (each
// output is summed by one thread, over all of K, in this order): batch invariant bit for bit.
//
// CPUs with AMX (Intel Xeon since Sapphire Rapids) take another sum for the rows of full tiles,
// at every M: tdpbf16ps over 16 k-pairs at a time, whose rounding inside an instruction is not
// vdpbf16ps's (it matched none of the sequential orders on 256 random sums; the results stay
// within the tests' fp32 accumulation bound). Still one sum per output whatever M is (a row of
// the A tile is never mixed with another), so batch invariance holds there too; the rows of the
// last, narrower tile keep the vector code at every M. AVX-512 BF16 alone is compute-bound
// beyond one or two rows on such a CPU: a whole SmolLM2 pass at 8 rows took 23 ms against
// oneDNN's 14.5 (its own AMX code) and 54 against 17 at 32 (bench/README.md).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "amx.h"
#include "checks.h"
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace peftserve_cpu {

namespace {

constexpr int64_t TILE = 32;         // rows of W per tile
// rows of x summed together over one pass of a tile (AVX2: see tile_avx2)
#if defined(__AVX512BF16__) || !defined(__AVX2__)
constexpr int64_t MAX_GROUP = 8;
#else
constexpr int64_t MAX_GROUP = 4;
#endif
constexpr int64_t ROW_CHUNK = 64;    // rows of x per pass over the weights (larger M: x in L2)
// AVX2 only: the k-pair 1024 bytes (8 k-pairs of a full tile) ahead is prefetched. Measured on
// Zen 3 (2 threads, a whole SmolLM2 pass, 9 interleaved rounds): 0.93 / 0.94 / 0.89 / 0.83 /
// 0.91x the time without at 1 / 2 / 4 / 8 / 16 rows; 512 bytes ahead was slower, 2048 and 4096
// the same within noise.
constexpr int64_t AVX2_PREFETCH = 1024;

struct Problem {
  const uint16_t* w;   // tiles
  const float* xf;     // [M, Kp, 2] x as fp32, K padded with a zero
  const uint32_t* xp;  // [M, Kp] x's bf16 pairs, K padded with a zero
  const float* bias;   // [N] fp32 or null
  uint16_t* y;         // [M, N] bf16, row stride ldy
  int64_t M, N, Kp, ldy;
};

// The epilogue shared by every path: acc (+ bias), rounded to bf16.
inline void store_row(const Problem& p, int64_t m, int64_t n0, int64_t width, const float* acc) {
  uint16_t* out = p.y + m * p.ldy + n0;
  if (p.bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      out[i] = bf16_bits(acc[i] + p.bias[n0 + i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      out[i] = bf16_bits(acc[i]);
    }
  }
}

// Plain loops: rows m0..m0+g of one tile (w: its first k-pair, width rows).
void tile_generic(const Problem& p, const uint16_t* w, int64_t n0, int64_t width, int64_t m0,
                  int64_t g) {
  for (int64_t m = m0; m < m0 + g; ++m) {
    float acc[TILE] = {};
    const float* x = p.xf + m * p.Kp * 2;
    for (int64_t kp = 0; kp < p.Kp; ++kp) {
      const uint16_t* wk = w + kp * width * 2;
      const float x_even = x[2 * kp], x_odd = x[2 * kp + 1];
      for (int64_t i = 0; i < width; ++i) {
        acc[i] += bf16_value(wk[2 * i + 1]) * x_odd;
        acc[i] += bf16_value(wk[2 * i]) * x_even;
      }
    }
    store_row(p, m, n0, width, acc);
  }
}

// The row loops below are folds over std::index_sequence, every accumulator index a constant:
// with loops over an array of vectors GCC 12 stores each accumulator to the stack on every
// iteration.
#if defined(__AVX512BF16__)
// vdpbf16ps: each 32-bit lane of a weight load is one row's k-pair; x's pair is broadcast.
template <size_t... g>
void tile_bf16(std::index_sequence<g...>, const Problem& p, const uint16_t* w, int64_t n0,
               int64_t width, int64_t m0) {
  constexpr size_t G = sizeof...(g);
  const __mmask32 mask0 = width >= 16 ? ~__mmask32(0) : __mmask32((1u << (2 * width)) - 1);
  const __mmask32 mask1 =
      width >= 32 ? ~__mmask32(0)
                  : (width <= 16 ? __mmask32(0) : __mmask32((1u << (2 * (width - 16))) - 1));
  __m512 acc0[G] = {(static_cast<void>(g), _mm512_setzero_ps())...};
  __m512 acc1[G] = {(static_cast<void>(g), _mm512_setzero_ps())...};
  const int64_t Kp = p.Kp, step = width * 2;
  const int32_t* x = reinterpret_cast<const int32_t*>(p.xp + m0 * Kp);
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const uint16_t* wk = w + kp * step;
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mask0, wk);
    const __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi16(mask1, wk + 32);
    ((acc0[g] = _mm512_dpbf16_ps(acc0[g], w0, (__m512bh)_mm512_set1_epi32(x[g * Kp + kp])),
      acc1[g] = _mm512_dpbf16_ps(acc1[g], w1, (__m512bh)_mm512_set1_epi32(x[g * Kp + kp]))),
     ...);
  }
  alignas(64) float out[G][TILE];
  ((_mm512_store_ps(out[g], acc0[g]), _mm512_store_ps(out[g] + 16, acc1[g])), ...);
  (store_row(p, m0 + static_cast<int64_t>(g), n0, width, out[g]), ...);
}
#elif defined(__AVX2__)
// bf16 -> fp32 by shifting: the low half of a 32-bit lane (even k) moves up 16 bits, the high
// half (odd k) is masked; two FMAs in vdpbf16ps's order. A ymm register holds one k-pair of 8
// rows (a slab; a tile has 4).
inline __attribute__((always_inline)) void avx2_split(__m256i pair, __m256& odd, __m256& even) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  odd = _mm256_castsi256_ps(_mm256_and_si256(pair, high));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
}

// One slab's k-pair into G rows' accumulators.
template <size_t... g>
inline __attribute__((always_inline)) void avx2_pair(std::index_sequence<g...>, __m256* acc,
                                                     __m256i pair, const float* x, int64_t ldx) {
  __m256 odd, even;
  avx2_split(pair, odd, even);
  ((acc[g] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(x + g * ldx + 1), acc[g]),
    acc[g] = _mm256_fmadd_ps(even, _mm256_broadcast_ss(x + g * ldx), acc[g])),
   ...);
}

// One row of x into S slabs' accumulators (the slabs' k-pair already split into odd and even
// halves): two broadcasts, each used at once. Two slabs of 3 or 4 rows (tile_avx2) are split
// once and the rows taken one by one: as avx2_pair for each slab, the compiler shares each
// row's broadcasts between the slabs and holds all 2 * G of them with the 2 * G accumulators,
// more than 16 registers: two accumulators went to the stack and every k-pair waited on their
// store and reload. 20 matrices of SmolLM2's gate/up shape (3072 x 576) at 4 rows, alternated
// processes: 15.7 GB/s against 13.0 (5 rounds, Zen 3); 1 or 2 rows (4 slabs) keep avx2_pair,
// which spills nothing there.
template <int64_t S, size_t G>
inline __attribute__((always_inline)) void avx2_row(__m256 (&acc)[S][G], size_t row,
                                                    const __m256 (&odd)[S],
                                                    const __m256 (&even)[S], const float* x) {
  const __m256 x_odd = _mm256_broadcast_ss(x + 1);
  for (int64_t s = 0; s < S; ++s) {
    acc[s][row] = _mm256_fmadd_ps(odd[s], x_odd, acc[s][row]);
  }
  const __m256 x_even = _mm256_broadcast_ss(x);
  for (int64_t s = 0; s < S; ++s) {
    acc[s][row] = _mm256_fmadd_ps(even[s], x_even, acc[s][row]);
  }
}

// A full tile: S slabs at once (S * G accumulators), so the tile's 128 bytes of a k-pair are
// read once, front to back, and S * G independent chains of two dependent FMAs (8 cycles a
// k-pair on Zen 3) keep the FMA pipes busy: one slab at a time, one row (G = 1) ran one chain
// at 4 bytes a cycle, ~2x the read floor of a decode step.
template <int64_t S, size_t... g>
void tile_avx2_full(std::index_sequence<g...> rows, const Problem& p, const uint16_t* w,
                    int64_t n0, int64_t m0) {
  constexpr size_t G = sizeof...(g);
  const int64_t Kp = p.Kp, ldx = 2 * Kp;
  const float* x = p.xf + m0 * ldx;
  alignas(32) float out[G][TILE];
  for (int64_t j0 = 0; j0 < TILE / 8; j0 += S) {
    __m256 acc[S][G];
    for (int64_t s = 0; s < S; ++s) {
      ((acc[s][g] = _mm256_setzero_ps()), ...);
    }
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const auto* wk = reinterpret_cast<const __m256i*>(w + kp * 2 * TILE) + j0;
      const float* xk = x + 2 * kp;
      if (j0 == 0) {  // the first pass over the tile brings it in
        const char* ahead = reinterpret_cast<const char*>(wk) + AVX2_PREFETCH;
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
      }
      if constexpr (S == 4) {  // 2 * G <= 4 broadcasts: they fit
        avx2_pair(rows, acc[0], _mm256_loadu_si256(wk), xk, ldx);
        avx2_pair(rows, acc[1], _mm256_loadu_si256(wk + 1), xk, ldx);
        avx2_pair(rows, acc[2], _mm256_loadu_si256(wk + 2), xk, ldx);
        avx2_pair(rows, acc[3], _mm256_loadu_si256(wk + 3), xk, ldx);
      } else {
        __m256 odd[S], even[S];
        for (int64_t s = 0; s < S; ++s) {
          avx2_split(_mm256_loadu_si256(wk + s), odd[s], even[s]);
        }
        (avx2_row(acc, g, odd, even, xk + g * ldx), ...);
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      (_mm256_store_ps(out[g] + 8 * (j0 + s), acc[s][g]), ...);
    }
  }
  (store_row(p, m0 + static_cast<int64_t>(g), n0, TILE, out[g]), ...);
}

// The last tile, narrower than TILE: one slab at a time, masked loads.
template <size_t... g>
void tile_avx2_part(std::index_sequence<g...> rows, const Problem& p, const uint16_t* w,
                    int64_t n0, int64_t width, int64_t m0) {
  constexpr size_t G = sizeof...(g);
  const int64_t Kp = p.Kp, step = width * 2, ldx = 2 * Kp;
  const float* x = p.xf + m0 * ldx;
  alignas(32) float out[G][TILE];
  for (int64_t j = 0; j * 8 < width; ++j) {
    alignas(32) int32_t lanes[8];
    for (int64_t i = 0; i < 8; ++i) {
      lanes[i] = j * 8 + i < width ? -1 : 0;
    }
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    __m256 acc[G] = {(static_cast<void>(g), _mm256_setzero_ps())...};
    for (int64_t kp = 0; kp < Kp; ++kp) {
      avx2_pair(rows, acc,
                _mm256_maskload_epi32(reinterpret_cast<const int*>(w + kp * step) + j * 8, mask),
                x + 2 * kp, ldx);
    }
    (_mm256_store_ps(out[g] + 8 * j, acc[g]), ...);
  }
  (store_row(p, m0 + static_cast<int64_t>(g), n0, width, out[g]), ...);
}

// Slabs at once by rows of x: 4 for 1-2 rows, 2 for 3-4 (8 accumulators at most of 16
// registers). More rows take passes of 4 (MAX_GROUP): one slab of 5-8 rows (8 accumulators,
// 2 * G broadcasts a k-pair) spent ~15 cycles a k-pair where two slabs of 4 (half the
// broadcasts for the same FMAs) spend ~11 (one thread, weights in L3, Zen 3). The same 20
// gate/up-shaped matrices, alternated processes (5 rounds): 1.23x at 6 rows, 1.04x at 8, 1.21x
// at 16, 1.22x at 32 against one slab of 8; a whole SmolLM2 pass ~1.15x at 8 rows, ~1.3x at 32
// (bench/README.md).
template <size_t... g>
void tile_avx2(std::index_sequence<g...> rows, const Problem& p, const uint16_t* w, int64_t n0,
               int64_t width, int64_t m0) {
  constexpr size_t G = sizeof...(g);
  static_assert(G <= MAX_GROUP);
  if (width < TILE) {
    tile_avx2_part(rows, p, w, n0, width, m0);
  } else if constexpr (G <= 2) {
    tile_avx2_full<4>(rows, p, w, n0, m0);
  } else {
    tile_avx2_full<2>(rows, p, w, n0, m0);
  }
}
#endif

// Rows m0..m0+g (g <= MAX_GROUP) of one tile, on the widest path this build has.
void tile_rows(const Problem& p, const uint16_t* w, int64_t n0, int64_t width, int64_t m0,
               int64_t g, bool generic) {
  if (generic) {
    tile_generic(p, w, n0, width, m0, g);
    return;
  }
#if defined(__AVX512BF16__)
#define PEFTSERVE_TILE(G) tile_bf16(std::make_index_sequence<G>(), p, w, n0, width, m0)
#elif defined(__AVX2__)
#define PEFTSERVE_TILE(G) tile_avx2(std::make_index_sequence<G>(), p, w, n0, width, m0)
#endif
#if defined(PEFTSERVE_TILE)
  switch (g) {
    case 1: return PEFTSERVE_TILE(1);
    case 2: return PEFTSERVE_TILE(2);
    case 3: return PEFTSERVE_TILE(3);
#if !defined(__AVX512BF16__)  // AVX2: MAX_GROUP 4
    default: return PEFTSERVE_TILE(4);
#else
    case 4: return PEFTSERVE_TILE(4);
    case 5: return PEFTSERVE_TILE(5);
    case 6: return PEFTSERVE_TILE(6);
    case 7: return PEFTSERVE_TILE(7);
    default: return PEFTSERVE_TILE(8);
#endif
  }
#undef PEFTSERVE_TILE
#else
  tile_generic(p, w, n0, width, m0, g);
#endif
}

void gemv_run(const Problem& p, bool generic) {
  const int64_t tiles = (p.N + TILE - 1) / TILE;
  // Contiguous tile ranges per thread: each reads one stretch of the weights, start to end.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = 0; r0 < p.M; r0 += ROW_CHUNK) {
      const int64_t r1 = std::min(p.M, r0 + ROW_CHUNK);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TILE, width = std::min(TILE, p.N - n0);
        const uint16_t* w = p.w + n0 * p.Kp * 2;  // every earlier tile is full
        for (int64_t m = r0; m < r1; m += MAX_GROUP) {
          tile_rows(p, w, n0, width, m, std::min(MAX_GROUP, r1 - m), generic);
        }
      }
    }
  });
}

#if defined(PEFTSERVE_AMX)
// AMX: C[rows, 16] += A[rows, 16 k-pairs] . B[16 k-pairs, 16 columns as pairs]. The layout's
// k-pair of a full tile is 128 bytes, two B rows of 64 (tile rows 0-15 and 16-31), so a B tile
// is 16 k-pairs read with a 128-byte stride; A is x's bf16 pairs ([M, Kp], rows padded to 16
// when M > 16), C one 16-column half of the tile's outputs per accumulator tile.

// Tiles 0-1: the accumulators (output columns 0-15, 16-31 of a tile); 2-4: A and the two B
// halves over 16 k-pairs; 5-7: the same over the Kp % 16 last k-pairs.
TileConfig amx_config(int64_t rows, int64_t tail) {
  TileConfig c;
  c.set(0, rows, 64);
  c.set(1, rows, 64);
  c.set(2, rows, 64);
  c.set(3, AMX_ROWS, 64);
  c.set(4, AMX_ROWS, 64);
  if (tail > 0) {
    c.set(5, rows, 4 * tail);
    c.set(6, tail, 64);
    c.set(7, tail, 64);
  }
  return c;
}

// The first pass over a tile prefetches its weights this far ahead of the tile loads (into
// the next tile at its end: a thread's tiles lie one after another), each of the 2 KB a step
// reads. Without, a one-row pass was memory-bound well short of a plain read of the same
// weights: a tile load waits on the multiplies that read its tile register before it, so tile
// loads do not run ahead as a vector loop's loads do. A whole SmolLM2 pass at one row (the
// tiles in a C++ loop, 21 interleaved rounds, Intel Xeon, 2 threads): 8.02 ms 1 KB ahead
// against 9.09 without and 7.6-7.8 for a plain AVX-512 read; 512 B 8.06, 2 KB 8.17, 4 KB 8.47;
// touching the same lines with vector loads instead 8.2-8.6; prefetchnta 1.3-1.5x slower.
constexpr int64_t AMX_PREFETCH = 1024;

// Rows m0..m0+rows of one full tile (rows: the configured A and C tile rows); `first`: the
// first rows of x over this tile (the pass that brings it in).
void tile_amx(const Problem& p, const uint32_t* xp, const uint16_t* w, int64_t n0, int64_t m0,
              int64_t rows, bool first) {
  const int64_t Kp = p.Kp, full = Kp - Kp % AMX_ROWS;
  const uint32_t* x = xp + m0 * Kp;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k0 = 0; k0 < full; k0 += AMX_ROWS) {
    const uint16_t* wk = w + k0 * 2 * TILE;
    if (first) {
      prefetch_ahead(wk, AMX_PREFETCH, AMX_ROWS * 2 * TILE * 2);
    }
    _tile_loadd(2, x + k0, Kp * 4);
    _tile_loadd(3, wk, 2 * TILE * 2);
    _tile_loadd(4, wk + TILE, 2 * TILE * 2);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  if (full < Kp) {
    const uint16_t* wk = w + full * 2 * TILE;
    _tile_loadd(5, x + full, Kp * 4);
    _tile_loadd(6, wk, 2 * TILE * 2);
    _tile_loadd(7, wk + TILE, 2 * TILE * 2);
    _tile_dpbf16ps(0, 5, 6);
    _tile_dpbf16ps(1, 5, 7);
  }
  alignas(64) float out[AMX_ROWS][TILE];
  _tile_stored(0, out[0], TILE * 4);
  _tile_stored(1, out[0] + 16, TILE * 4);
  for (int64_t r = 0; r < std::min(rows, p.M - m0); ++r) {
    store_row(p, m0 + r, n0, TILE, out[r]);
  }
}

// The whole call on AMX (full tiles; the narrower last one on the vector code). xp: x's pairs
// with rows padded to a multiple of 16 when M > 16 (zeros).
void gemv_run_amx(const Problem& p, const uint32_t* xp) {
  const int64_t tiles = (p.N + TILE - 1) / TILE, full_tiles = p.N / TILE;
  const int64_t rows = std::min(p.M, AMX_ROWS);
  const TileConfig cfg = amx_config(rows, p.Kp % AMX_ROWS);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    // Each thread configures its own tiles (other code, oneDNN's, may have changed them).
    _tile_loadconfig(&cfg);
    for (int64_t r0 = 0; r0 < p.M; r0 += ROW_CHUNK) {
      const int64_t r1 = std::min(p.M, r0 + ROW_CHUNK);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TILE;
        const uint16_t* w = p.w + n0 * p.Kp * 2;
        if (t < full_tiles) {
          for (int64_t m = r0; m < r1; m += AMX_ROWS) {
            tile_amx(p, xp, w, n0, m, rows, m == 0);
          }
        } else {
          for (int64_t m = r0; m < r1; m += MAX_GROUP) {
            tile_rows(p, w, n0, p.N - n0, m, std::min(MAX_GROUP, r1 - m), false);
          }
        }
      }
    }
    _tile_release();
  });
}
#endif

void check_gemv_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "gemv_bf16";
  check_dense_cpu(out, op, "out");
  check_dense_cpu(x, op, "x");
  check_dense_cpu(w, op, "w");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              op, ": out, x and w must be bfloat16, got ", out.scalar_type(), ", ",
              x.scalar_type(), ", ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), op,
              ": x must be [M, K] with contiguous rows, got sizes ", x.sizes(), " strides ",
              x.strides());
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 2 && w.is_contiguous(), op,
              ": w must be a contiguous [N, ceil(K/2), 2] tensor from kernels/gemv.py pack(), got ",
              w.sizes());
  TORCH_CHECK(w.size(1) == (x.size(1) + 1) / 2, op, ": w packs K = ", 2 * w.size(1) - 1, " or ",
              2 * w.size(1), " columns, x has ", x.size(1));
  check_linear_out(out, x, w.size(0), bias, op);
}

}  // namespace

// True where gemv_bf16 takes AMX by default.
bool gemv_bf16_amx() {
  return amx_available();
}

void gemv_bf16(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
               const std::optional<at::Tensor>& bias, bool generic, bool amx) {
  check_gemv_args(out, x, w, bias);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1);
  if (M == 0 || N == 0) {
    return;
  }
  const bool on_amx = amx && !generic && gemv_bf16_amx();
  // x once as bf16 pairs and as fp32, K padded with a zero (an odd K's last pair): the
  // kernels read whole pairs and never past a row (AMX's A tiles: 16 rows at a time beyond
  // 16 rows, the padding rows zero). Copied before out is written, so out may alias x.
  const int64_t x_rows = amx_x_rows(M, on_amx);
  std::vector<uint32_t> xp(static_cast<size_t>(x_rows * Kp));
  // The pairs are x's row as it lies (little-endian: x[2i], x[2i + 1] is the word i), copied;
  // the fp32 copy only where the plain loops or the AVX2 code read it. One element at a time,
  // both took ~0.3 ms a call at 128 rows of K = 1536, most of a prefill chunk's pass on AMX.
#if defined(__AVX512BF16__)
  const bool fp32_x = generic;
#else
  const bool fp32_x = true;
#endif
  std::vector<float> xf(fp32_x ? static_cast<size_t>(M * Kp * 2) : 0);
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* row = xs + m * x.stride(0);
    std::memcpy(xp.data() + m * Kp, row, static_cast<size_t>(2 * K));
    for (int64_t k = 0; fp32_x && k < K; ++k) {
      xf[m * Kp * 2 + k] = bf16_value(row[k]);
    }
  }
  std::vector<float> bf;
  if (bias.has_value()) {
    const auto* b = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
    bf.resize(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      bf[n] = bf16_value(b[n]);
    }
  }
  const Problem p{reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                  xf.data(),
                  xp.data(),
                  bias.has_value() ? bf.data() : nullptr,
                  reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()),
                  M,
                  N,
                  Kp,
                  out.stride(0)};
#if defined(PEFTSERVE_AMX)
  if (on_amx) {
    gemv_run_amx(p, xp.data());
    return;
  }
#endif
  gemv_run(p, generic);
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def(
      "gemv_bf16(Tensor(a!) out, Tensor x, Tensor w, Tensor? bias, bool generic=False, "
      "bool amx=True) -> ()");
  m.def("gemv_bf16_amx() -> bool", &peftserve_cpu::gemv_bf16_amx);
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("gemv_bf16", &peftserve_cpu::gemv_bf16);
}
