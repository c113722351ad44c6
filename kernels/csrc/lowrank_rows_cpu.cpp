// The adapter deltas of a step in half precision on the CPU, token by token: each token
// against its own slot's packed weights at their exact rank (kernels/cpu_lowrank.py PackedLora:
// A [R, in] and each slice's B^T block [r_i, out_i], one after another; PackedBottleneck).
//
// A decode step with one token per adapter is the case torch's matmuls serve worst: a LoRA
// segment costs two calls of ~10-25 us whatever their size, so 32 adapters on all projections
// cost ~250 calls a layer, and the batched forms (padded, fused) multiply every token against
// weights it does not use. Here a token reads its slot's A (rank x in) and the blocks of B its
// slices own, once, and the step reads each active adapter's weights about once: the bytes
// bound that bench/multi_adapter.py's floor counts.
//
// Sums in fp32, one rounding when the delta is added to y (the torch forms round the rank-r
// intermediate and the delta each to the dtype: these results are closer to the float64
// reference). A token's result does not depend on the other tokens of the step or of its
// segment: the loops per token are the same whatever the batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace peftserve_cpu {

namespace {

// Brings the next token's weights towards the caches while this token computes, a few lines
// per row of work: a token's weights are short streams (a few KB per row block) that the
// hardware prefetchers alone leave latency-bound (~5 GB/s on one core here against ~20).
struct Prefetcher {
  const char* p = nullptr;
  int64_t bytes = 0, done = 0;

  void reset(const at::Tensor& t) {
    p = static_cast<const char*>(t.data_ptr());
    bytes = t.nbytes();
    done = 0;
  }
  // Everything up to fraction num / den of the tensor.
  void upto(int64_t num, int64_t den) {
    const int64_t target = den > 0 ? bytes * num / den : bytes;
    for (; done < target; done += 64) {
      __builtin_prefetch(p + done, 0, 2);
    }
  }
};

template <typename scalar_t>
inline float dot(const scalar_t* a, const float* x, int64_t n) {
  using F = Fp32<scalar_t>;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) {
    acc += F::load(a, k) * x[k];
  }
  return acc;
}

// out[0:4] = the dots of rows a, a + n, a + 2n, a + 3n with x: x read once for four rows.
template <typename scalar_t>
inline void dot4(float* out, const scalar_t* a, const float* x, int64_t n) {
  using F = Fp32<scalar_t>;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < n; ++k) {
    const float xk = x[k];
    s0 += F::load(a, k) * xk;
    s1 += F::load(a + n, k) * xk;
    s2 += F::load(a + 2 * n, k) * xk;
    s3 += F::load(a + 3 * n, k) * xk;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// v[0:R] = A[0:R, :] x, A row-major [R, n].
template <typename scalar_t>
inline void gemv(float* v, const scalar_t* A, const float* x, int64_t R, int64_t n,
                 Prefetcher& next) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    next.upto(r + 4, R);
    dot4(v + r, A + r * n, x, n);
  }
  for (; r < R; ++r) {
    v[r] = dot(A + r * n, x, n);
  }
  next.upto(1, 1);
}

// acc[0:n] += sum over r < R of v[r] * b[r * ld : r * ld + n]; four rows per pass over acc.
template <typename scalar_t>
inline void gemv_t(float* acc, const float* v, const scalar_t* b, int64_t ld, int64_t R,
                   int64_t n, Prefetcher& next, int64_t rows_before, int64_t rows_total) {
  using F = Fp32<scalar_t>;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    next.upto(rows_before + r + 4, rows_total);
    const scalar_t *b0 = b + r * ld, *b1 = b0 + ld, *b2 = b1 + ld, *b3 = b2 + ld;
    const float v0 = v[r], v1 = v[r + 1], v2 = v[r + 2], v3 = v[r + 3];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      acc[k] += v0 * F::load(b0, k) + v1 * F::load(b1, k) + v2 * F::load(b2, k) +
                v3 * F::load(b3, k);
    }
  }
  for (; r < R; ++r) {
    const scalar_t* br = b + r * ld;
    const float vr = v[r];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      acc[k] += vr * F::load(br, k);
    }
  }
  next.upto(rows_before + R, rows_total);
}

// kernels/activation.py's codes: 0 none, 1 relu, 2 silu, 3 gelu (exact, erf).
inline float activate(float h, int64_t act) {
  switch (act) {
    case 1:
      return h > 0.f ? h : 0.f;
    case 2:
      return h * sigmoid(h);
    case 3:
      return 0.5f * h * (1.f + std::erf(h * 0.70710678118654752f));
    default:
      return h;
  }
}

// (segment, position in sorted order) of every token the call updates.
std::vector<std::pair<int64_t, int64_t>> work_items(at::IntArrayRef bounds, int64_t positions,
                                                    const char* op) {
  TORCH_CHECK(bounds.size() % 2 == 0, op, ": bounds must hold (row0, row1) per segment");
  std::vector<std::pair<int64_t, int64_t>> work;
  for (size_t j = 0; j < bounds.size() / 2; ++j) {
    const int64_t a = bounds[2 * j], b = bounds[2 * j + 1];
    TORCH_CHECK(0 <= a && a <= b && b <= positions, op, ": segment ", j, " rows ", a, "..", b,
                " outside 0..", positions);
    for (int64_t p = a; p < b; ++p) {
      work.emplace_back(static_cast<int64_t>(j), p);
    }
  }
  return work;
}

// The token row of sorted position p: rows[p], or p itself when rows is absent.
const int64_t* checked_rows(const std::optional<at::Tensor>& rows, int64_t T, const char* op) {
  if (!rows.has_value()) {
    return nullptr;
  }
  check_dense_cpu(*rows, op, "rows");
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->is_contiguous(), op,
              ": rows must be a contiguous int64 vector");
  const int64_t* r = rows->data_ptr<int64_t>();
  for (int64_t i = 0; i < rows->numel(); ++i) {
    TORCH_CHECK(0 <= r[i] && r[i] < T, op, ": row ", r[i], " outside 0..", T);
  }
  return r;
}

int64_t positions_of(const std::optional<at::Tensor>& rows, int64_t T) {
  return rows.has_value() ? rows->numel() : T;
}

void check_weight(const at::Tensor& w, int64_t rows, int64_t cols, at::ScalarType dtype,
                  const char* op, const char* name) {
  check_dense_cpu(w, op, name);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.is_contiguous() &&
                  w.scalar_type() == dtype,
              op, ": ", name, " must be a contiguous [", rows, ", ", cols, "] of y's dtype, got ",
              w.sizes(), " ", w.scalar_type());
}

template <typename scalar_t>
void lora_rows_kernel(const at::Tensor& y, const at::Tensor& x, const int64_t* rows,
                      const std::vector<std::pair<int64_t, int64_t>>& work, at::TensorList A,
                      at::TensorList B_blocks, at::IntArrayRef ranks, at::IntArrayRef offsets) {
  using F = Fp32<scalar_t>;
  const int64_t d_in = x.size(1);
  const int64_t n_slices = static_cast<int64_t>(offsets.size()) - 1;
  int64_t max_rank = 0, max_width = 0;
  for (const at::Tensor& a : A) {
    max_rank = std::max(max_rank, a.size(0));
  }
  for (int64_t i = 0; i < n_slices; ++i) {
    max_width = std::max(max_width, offsets[i + 1] - offsets[i]);
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t y_stride = y.stride(0), x_stride = x.stride(0);
  const int64_t n_work = static_cast<int64_t>(work.size());
  at::parallel_for(0, n_work, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(d_in), v(max_rank), acc(max_width);
    Prefetcher next_a, next_b;
    for (int64_t w = begin; w < end; ++w) {
      const auto [j, p] = work[w];
      const bool new_next = w + 1 < end && work[w + 1].first != j;
      next_a = next_b = Prefetcher{};
      if (new_next) {
        next_a.reset(A[work[w + 1].first]);
        next_b.reset(B_blocks[work[w + 1].first]);
      }
      const int64_t row = rows ? rows[p] : p;
      const scalar_t* xr = xp + row * x_stride;
#pragma omp simd
      for (int64_t k = 0; k < d_in; ++k) {
        xf[k] = F::load(xr, k);
      }
      const int64_t R = A[j].size(0);
      gemv(v.data(), A[j].data_ptr<scalar_t>(), xf.data(), R, d_in, next_a);
      const scalar_t* bt = B_blocks[j].data_ptr<scalar_t>();  // slice i's [r_i, width_i]
      scalar_t* yr = yp + row * y_stride;
      int64_t c = 0;
      for (int64_t i = 0; i < n_slices; ++i) {
        const int64_t ri = ranks[j * n_slices + i];
        if (ri == 0) {
          continue;
        }
        const int64_t o0 = offsets[i], width = offsets[i + 1] - o0;
        std::fill(acc.begin(), acc.begin() + width, 0.f);
        gemv_t(acc.data(), v.data() + c, bt, width, ri, width, next_b, c, R);
#pragma omp simd
        for (int64_t o = 0; o < width; ++o) {
          F::store(yr, o0 + o, F::load(yr, o0 + o) + acc[o]);
        }
        c += ri;
        bt += ri * width;
      }
    }
  });
}

template <typename scalar_t>
void bottleneck_rows_kernel(const at::Tensor& y, const int64_t* rows,
                            const std::vector<std::pair<int64_t, int64_t>>& work,
                            at::TensorList A, at::TensorList b_down, at::TensorList B_t,
                            at::TensorList b_up, at::ArrayRef<double> scales, int64_t act) {
  using F = Fp32<scalar_t>;
  const int64_t H = y.size(1);
  int64_t max_rank = 0;
  for (const at::Tensor& a : A) {
    max_rank = std::max(max_rank, a.size(0));
  }
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t y_stride = y.stride(0);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> yf(H), h(max_rank), acc(H);
    Prefetcher next_a, next_b;
    for (int64_t w = begin; w < end; ++w) {
      const auto [j, p] = work[w];
      next_a = next_b = Prefetcher{};
      if (w + 1 < end && work[w + 1].first != j) {
        next_a.reset(A[work[w + 1].first]);
        next_b.reset(B_t[work[w + 1].first]);
      }
      const int64_t row = rows ? rows[p] : p;
      scalar_t* yr = yp + row * y_stride;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        yf[k] = F::load(yr, k);  // the sub-layer output, read before this token's update
      }
      const scalar_t* a = A[j].data_ptr<scalar_t>();
      const scalar_t* bd = b_down[j].data_ptr<scalar_t>();
      const int64_t R = A[j].size(0);
      gemv(h.data(), a, yf.data(), R, H, next_a);
      for (int64_t r = 0; r < R; ++r) {
        h[r] = activate(h[r] + F::load(bd, r), act);
      }
      const scalar_t* bu = b_up[j].data_ptr<scalar_t>();
      for (int64_t k = 0; k < H; ++k) {
        acc[k] = F::load(bu, k);
      }
      const scalar_t* bt = B_t[j].data_ptr<scalar_t>();
      gemv_t(acc.data(), h.data(), bt, H, R, H, next_b, 0, R);
      const float s = static_cast<float>(scales[j]);
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        F::store(yr, k, yf[k] + s * acc[k]);
      }
    }
  });
}

void check_y(const at::Tensor& y, const char* op) {
  check_dense_cpu(y, op, "y");
  TORCH_CHECK(y.dim() == 2 && y.stride(1) == 1, op, ": y must be [T, out] with unit column stride");
  check_rows_apart(y, op, "y");
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf, op,
              ": half precision only (fp32 keeps the torch forms), got ", y.scalar_type());
}

}  // namespace

void lora_rows(const at::Tensor& y, const at::Tensor& x, const std::optional<at::Tensor>& rows,
               at::IntArrayRef bounds, at::TensorList A, at::TensorList B_blocks,
               at::IntArrayRef ranks, at::IntArrayRef offsets) {
  const char* op = "lora_rows";
  check_y(y, op);
  check_dense_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == y.size(0) && x.stride(1) == 1 &&
                  x.scalar_type() == y.scalar_type(),
              op, ": x must be [T, in] of y's dtype with unit column stride");
  TORCH_CHECK(offsets.size() >= 2 && offsets.front() == 0 && offsets.back() == y.size(1), op,
              ": offsets must run from 0 to y's width");
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] <= offsets[i + 1], op, ": offsets must not decrease, got ", offsets);
  }
  const int64_t n_segments = static_cast<int64_t>(bounds.size()) / 2;
  const int64_t n_slices = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(static_cast<int64_t>(A.size()) == n_segments &&
                  static_cast<int64_t>(B_blocks.size()) == n_segments &&
                  static_cast<int64_t>(ranks.size()) == n_segments * n_slices,
              op, ": one A, one B_blocks and n_slices ranks per segment");
  for (int64_t j = 0; j < n_segments; ++j) {
    int64_t R = 0, block_elems = 0;
    for (int64_t i = 0; i < n_slices; ++i) {
      const int64_t ri = ranks[j * n_slices + i];
      TORCH_CHECK(ri >= 0, op, ": negative rank");
      R += ri;
      block_elems += ri * (offsets[i + 1] - offsets[i]);
    }
    check_weight(A[j], R, x.size(1), y.scalar_type(), op, "A");
    TORCH_CHECK(B_blocks[j].dim() == 1, op, ": B_blocks must be flat, got ", B_blocks[j].sizes());
    check_weight(B_blocks[j].view({1, -1}), 1, block_elems, y.scalar_type(), op, "B_blocks");
  }
  const int64_t* r = checked_rows(rows, y.size(0), op);
  const auto work = work_items(bounds, positions_of(rows, y.size(0)), op);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "lowrank_rows", [&] {
    lora_rows_kernel<scalar_t>(y, x, r, work, A, B_blocks, ranks, offsets);
  });
}

void bottleneck_rows(const at::Tensor& y, const std::optional<at::Tensor>& rows,
                     at::IntArrayRef bounds, at::TensorList A, at::TensorList b_down,
                     at::TensorList B_t, at::TensorList b_up, at::ArrayRef<double> scales,
                     int64_t act) {
  const char* op = "bottleneck_rows";
  check_y(y, op);
  TORCH_CHECK(0 <= act && act <= 3, op, ": unknown activation code ", act);
  const int64_t n_segments = static_cast<int64_t>(bounds.size()) / 2, H = y.size(1);
  TORCH_CHECK(static_cast<int64_t>(A.size()) == n_segments &&
                  static_cast<int64_t>(b_down.size()) == n_segments &&
                  static_cast<int64_t>(B_t.size()) == n_segments &&
                  static_cast<int64_t>(b_up.size()) == n_segments &&
                  static_cast<int64_t>(scales.size()) == n_segments,
              op, ": one A, b_down, B_t, b_up and scale per segment");
  for (int64_t j = 0; j < n_segments; ++j) {
    check_dense_cpu(A[j], op, "A");
    TORCH_CHECK(A[j].dim() == 2, op, ": A must be [rank, hidden], got ", A[j].sizes());
    TORCH_CHECK(b_down[j].dim() == 1 && b_up[j].dim() == 1, op, ": b_down and b_up must be flat");
    const int64_t R = A[j].size(0);
    check_weight(A[j], R, H, y.scalar_type(), op, "A");
    check_weight(B_t[j], R, H, y.scalar_type(), op, "B_t");
    check_weight(b_down[j].view({1, -1}), 1, R, y.scalar_type(), op, "b_down");
    check_weight(b_up[j].view({1, -1}), 1, H, y.scalar_type(), op, "b_up");
  }
  const int64_t* r = checked_rows(rows, y.size(0), op);
  const auto work = work_items(bounds, positions_of(rows, y.size(0)), op);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "lowrank_rows", [&] {
    bottleneck_rows_kernel<scalar_t>(y, r, work, A, b_down, B_t, b_up, scales, act);
  });
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def(
      "lora_rows(Tensor(a!) y, Tensor x, Tensor? rows, int[] bounds, Tensor[] A, "
      "Tensor[] B_blocks, int[] ranks, int[] offsets) -> ()");
  m.def(
      "bottleneck_rows(Tensor(a!) y, Tensor? rows, int[] bounds, Tensor[] A, Tensor[] b_down, "
      "Tensor[] B_t, Tensor[] b_up, float[] scales, int act) -> ()");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("lora_rows", &peftserve_cpu::lora_rows);
  m.impl("bottleneck_rows", &peftserve_cpu::bottleneck_rows);
}
