// AMX (Intel Xeon since Sapphire Rapids), shared by the matrix-vector kernels: whether this
// build has it (PEFTSERVE_AMX, from -march), whether Linux grants it to the process, and the
// tile configuration. Each thread that runs tile instructions loads its configuration first
// (other code, oneDNN's, may have changed it) and releases the tiles when done.
#pragma once

// (AVX-512 BF16 too: the quantized kernel turns its weights into bf16 with that code.)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define PEFTSERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>

namespace peftserve_cpu {

#if defined(PEFTSERVE_AMX)
// Linux hands the tile registers to a process that asks once (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); where it refuses (a kernel before 5.16), the vector code serves.
inline bool amx_granted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// ldtilecfg's 64 bytes: palette 1, then each tile's bytes per row and rows (unused: zero).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int64_t tile_rows, int64_t bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(tile_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
};

// Prefetches `bytes` bytes from `distance` bytes past `from` (into L1). The kernels' tile
// instructions keep later loads from running ahead, so their weights are asked for this way
// (AMX_PREFETCH in gemv_bf16_cpu.cpp, AMX_PREFETCH_INT8 / _INT4 in gemv_quant_cpu.cpp).
inline void prefetch_ahead(const void* from, int64_t distance, int64_t bytes) {
  const char* ahead = static_cast<const char*>(from) + distance;
  for (int64_t line = 0; line < bytes; line += 64) {
    _mm_prefetch(ahead + line, _MM_HINT_T0);
  }
}
#endif

// Rows of x (A and C tile rows) and k-pairs per tdpbf16ps.
constexpr int64_t AMX_ROWS = 16;

// The rows of x's bf16 pairs a call on AMX reads: beyond AMX_ROWS rows, whole A tiles of
// AMX_ROWS (the padding rows zero); M where AMX does not serve.
inline int64_t amx_x_rows(int64_t M, bool on_amx) {
  return on_amx && M > AMX_ROWS ? (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS : M;
}

// True where the matrix-vector kernels take AMX (a build for a CPU with it, the OS granting it).
inline bool amx_available() {
#if defined(PEFTSERVE_AMX)
  return amx_granted();
#else
  return false;
#endif
}

}  // namespace peftserve_cpu
