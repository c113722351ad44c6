// How the matrix-vector kernels (gemv_bf16_cpu.cpp, gemv_quant_cpu.cpp) share a call's tiles
// of weight rows among the intra-op threads.
//
// Each thread streams its own contiguous share of the tiles front to back (one stream the
// hardware prefetcher follows), then takes the tiles the other threads have not reached yet,
// one at a time from the ends of their shares. With fixed shares a call lasted as long as its
// slower thread: at one row on 2 threads (Intel Xeon, a SmolLM2 decode step's 121 calls, timed
// inside the kernel) the threads finished 3.7-4 us apart on average, either one the last about
// as often, ~5% of a call. A tile is still summed by one thread over all of K, whichever
// thread that is: the results do not change.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace peftserve_cpu {

// The shares of a call's tiles: [front, back) of each share not taken yet.
class TileShares {
 public:
  TileShares(int64_t tiles, int64_t shares)
      : shares_(shares), state_(std::make_unique<Share[]>(static_cast<size_t>(shares))) {
    for (int64_t s = 0; s < shares; ++s) {
      state_[s].span.store(pack(tiles * s / shares, tiles * (s + 1) / shares),
                           std::memory_order_relaxed);
    }
  }

  int64_t shares() const { return shares_; }

  // A tile of share s, or -1 when it has none left: its front one for its owner, its back one
  // for another thread.
  int64_t take(int64_t s, bool owner) {
    std::atomic<uint64_t>& span = state_[s].span;
    uint64_t v = span.load(std::memory_order_relaxed);
    while (true) {
      const int64_t f = front(v), b = back(v);
      if (f >= b) {
        return -1;
      }
      const uint64_t taken = owner ? pack(f + 1, b) : pack(f, b - 1);
      if (span.compare_exchange_weak(v, taken, std::memory_order_relaxed)) {
        return owner ? f : b - 1;
      }
    }
  }

 private:
  struct alignas(64) Share {  // one cache line each: the owners' claims do not contend
    std::atomic<uint64_t> span;
  };
  static uint64_t pack(int64_t f, int64_t b) {
    return static_cast<uint64_t>(f) | (static_cast<uint64_t>(b) << 32);
  }
  static int64_t front(uint64_t v) { return static_cast<int64_t>(v & 0xFFFFFFFFu); }
  static int64_t back(uint64_t v) { return static_cast<int64_t>(v >> 32); }

  int64_t shares_;
  std::unique_ptr<Share[]> state_;
};

// One thread's walk: the tiles of its share in order, then the others' from their ends.
class TileWalk {
 public:
  TileWalk(TileShares& shares, int64_t share) : shares_(shares), share_(share) {}

  // The next tile, or -1 when every tile is taken.
  int64_t next() {
    if (own_) {
      if (const int64_t t = shares_.take(share_, true); t >= 0) {
        return t;
      }
      own_ = false;
    }
    for (int64_t i = 1; i < shares_.shares(); ++i) {
      if (const int64_t t = shares_.take((share_ + i) % shares_.shares(), false); t >= 0) {
        return t;
      }
    }
    return -1;
  }

 private:
  TileShares& shares_;
  int64_t share_;
  bool own_ = true;
};

// Runs thread_fn(walk) once per share of the tiles [0, tiles) on the intra-op threads (a share
// per thread; one thread takes them in turn inside another parallel region), walk a TileWalk:
// `for (int64_t t; (t = walk.next()) >= 0;)`.
template <typename F>
void parallel_tiles(int64_t tiles, const F& thread_fn) {
  if (tiles <= 0) {
    return;
  }
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  TileShares shares(tiles, n);
  at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      TileWalk walk(shares, s);
      thread_fn(walk);
    }
  });
}

}  // namespace peftserve_cpu
