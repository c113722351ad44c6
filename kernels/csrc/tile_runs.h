// The matrix-vector kernels' split of a weight matrix's tiles over the threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace peftserve_cpu {

// Runs fn(t0, t1) over runs of consecutive tiles that cover 0..tiles-1 once, each run on one
// thread, the threads taking the next run as they finish their last. A fixed half each left
// the first thread waiting at every call's end for the second (woken later, or slowed by the
// machine), ~10% of a decode step's time on 2 threads; with four runs a thread, the one that
// starts first takes more. A run is a contiguous stretch of the weights (the prefetchers'
// stream), and each output is still summed by one thread over all of K, so results do not
// depend on which thread takes which run.
template <typename Fn>
void for_tile_runs(int64_t tiles, const Fn& fn) {
  constexpr int64_t RUNS_PER_THREAD = 4;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1 || tiles <= 1) {
    fn(int64_t{0}, tiles);
    return;
  }
  const int64_t run = std::max<int64_t>(1, tiles / (threads * RUNS_PER_THREAD));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t0 = next.fetch_add(run); t0 < tiles; t0 = next.fetch_add(run)) {
      fn(t0, std::min(tiles, t0 + run));
    }
  });
}

}  // namespace peftserve_cpu
