// How the matrix-vector kernels (gemv_bf16_cpu.cpp, gemv_quant_cpu.cpp) share a call's tiles
// of weight rows among the intra-op threads, and what else they read while they stream them.
//
// Shares: each thread streams its own contiguous share of the tiles front to back (one stream
// the hardware prefetcher follows), then takes the tiles other threads have not reached yet,
// one at a time from the ends of their shares. With fixed shares a call lasted as long as its
// slower thread: at one row on 2 threads (Intel Xeon, a SmolLM2 decode step's 121 calls, timed
// inside the kernel) the threads finished 3.7-4 us apart on average, either one last about
// as often, ~4% of a call. A tile is still summed by one thread over all of K, whichever
// thread that is: the results do not change.
//
// Side reads: memory the op after a projection will read (the next attention's K/V blocks,
// decode_forward_cpu.cpp) is prefetched a few lines after each tile while the weights stream,
// each thread its share of it. Read cold after the weights of a layer had gone through the
// caches, one sequence's decode attention over ~170 positions took ~17 us a layer instead
// of ~9 warm.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace peftserve_cpu {

// Memory to prefetch while a projection streams its weights: (first byte, bytes) spans.
struct SideReads {
  std::vector<std::pair<const char*, int64_t>> spans;
  int64_t bytes = 0;

  void add(const void* p, int64_t n) {
    spans.emplace_back(static_cast<const char*>(p), n);
    bytes += n;
  }
  void clear() {
    spans.clear();
    bytes = 0;
  }
};

// One thread's walk over its part of the side reads: [begin, end) bytes of the spans laid end
// to end, `per_tile` bytes after each of its own tiles.
class SideCursor {
 public:
  SideCursor() = default;
  SideCursor(const SideReads* side, int64_t share, int64_t shares, int64_t own_tiles) {
    if (side == nullptr || side->bytes == 0 || own_tiles == 0) {
      return;
    }
    side_ = side;
    const int64_t lines = (side->bytes + 63) / 64;
    at_ = lines * share / shares * 64;
    end_ = std::min(side->bytes, lines * (share + 1) / shares * 64);
    per_tile_ = ((end_ - at_ + own_tiles - 1) / own_tiles + 63) / 64 * 64;
    // the span holding byte at_
    for (int64_t skipped = 0; span_ < side->spans.size(); ++span_) {
      const int64_t n = side->spans[span_].second;
      if (at_ - skipped < n) {
        offset_ = at_ - skipped;
        break;
      }
      skipped += n;
    }
  }

  // The next per_tile bytes of this thread's part.
  void after_tile() {
    for (int64_t done = 0; done < per_tile_ && at_ < end_ && span_ < side_->spans.size();) {
      const auto& [p, n] = side_->spans[span_];
#if defined(__SSE__)
      _mm_prefetch(p + offset_, _MM_HINT_T1);
#endif
      const int64_t step = std::min<int64_t>(64, n - offset_);
      offset_ += step;
      at_ += step;
      done += step;
      if (offset_ >= n) {
        ++span_;
        offset_ = 0;
      }
    }
  }

 private:
  const SideReads* side_ = nullptr;
  int64_t at_ = 0, end_ = 0, per_tile_ = 0, offset_ = 0;
  size_t span_ = 0;
};

// The shares of a call's tiles (see the top): [front, back) of each share not taken yet.
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

  int64_t size(int64_t share) const {
    const uint64_t v = state_[share].span.load(std::memory_order_relaxed);
    return back(v) - front(v);
  }

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
  struct alignas(64) Share {
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

// One thread's walk over the tiles of its share, then the others' (see the top).
class TileWalk {
 public:
  TileWalk(TileShares& shares, int64_t share, const SideReads* side)
      : shares_(shares), share_(share),
        side_(side, share, shares.shares(), shares.size(share)) {}

  // The next tile, or -1 when every tile is taken. After each of its own tiles, the next bytes
  // of this thread's part of the side reads are prefetched.
  int64_t next() {
    if (own_) {
      if (done_any_) {
        side_.after_tile();
      }
      done_any_ = true;
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
  SideCursor side_;
  bool own_ = true, done_any_ = false;
};

// Runs thread_fn(walk) once per share of the tiles [0, tiles) on the intra-op threads (one
// share per thread), walk a TileWalk: `for (int64_t t; (t = walk.next()) >= 0;)`. `side` may
// be null.
template <typename F>
void parallel_tiles(int64_t tiles, const SideReads* side, const F& thread_fn) {
  if (tiles <= 0) {
    return;
  }
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  TileShares shares(tiles, n);
  at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      TileWalk walk(shares, s, side);
      thread_fn(walk);
    }
  });
}

}  // namespace peftserve_cpu
