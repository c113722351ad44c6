// Greedy tokens from a bf16 LM head screened by its int8 copy: the rows whose int8 logit is
// within a rigorous bound of the best are computed again with the bf16 kernel, and each row's
// token is the argmax over their tiles, which is the full head's argmax bit for bit (the bound
// and its proof: kernels/screened_head.py). One op, one call from Python: the int8 pass, the
// screen, the gather of the candidates' tiles, their bf16 pass and the argmax.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace peftserve_cpu {

namespace {

constexpr int64_t TILE = 32;             // rows per tile of the bf16 layout (gemv_bf16_cpu.cpp)
constexpr int64_t CHUNK = 4096;          // vocabulary rows per piece of work in the screen
constexpr double SAFE_MAGNITUDE = 1e30;  // |x|_2 max|W[n]|_2 above it: no screen (no overflow)
constexpr double SLACK = 1.0 / 64;       // the bound's factor and the logits' rounding share

void check_screen_args(const at::Tensor& tokens, const at::Tensor& x, const at::Tensor& screen,
                       const at::Tensor& coef, const at::Tensor& head) {
  constexpr const char* op = "screened_argmax";
  check_dense_cpu(tokens, op, "tokens");
  check_dense_cpu(x, op, "x");
  check_dense_cpu(screen, op, "screen");
  check_dense_cpu(coef, op, "coef");
  check_dense_cpu(head, op, "head");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) > 0,
              op, ": x must be a contiguous bfloat16 [M, K], got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous() &&
                  tokens.size(0) == x.size(0),
              op, ": tokens must be a contiguous int64 [M] = [", x.size(0), "], got ",
              tokens.scalar_type(), " ", tokens.sizes());
  const int64_t V = head.size(0);
  TORCH_CHECK(head.scalar_type() == at::kBFloat16 && head.dim() == 3 && head.size(2) == 2 &&
                  head.is_contiguous() && head.size(1) == (x.size(1) + 1) / 2 && V > 0,
              op, ": head must be the contiguous [V, ceil(K/2), 2] bfloat16 of kernels/gemv.py "
              "pack() for K = ", x.size(1), ", got ", head.scalar_type(), " ", head.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 1 && coef.is_contiguous() &&
                  coef.size(0) == V,
              op, ": coef must be a contiguous float32 [V] = [", V, "], got ", coef.scalar_type(),
              " ", coef.sizes());
  TORCH_CHECK(screen.dim() >= 1 && screen.size(0) == V, op, ": screen must have the head's ",
              V, " rows, got ", screen.sizes());  // gemv_int8 checks the rest
}

}  // namespace

bool screened_argmax(const at::Tensor& tokens, const at::Tensor& x, const at::Tensor& screen,
                     const at::Tensor& coef, const at::Tensor& head, double max_norm,
                     double tiny) {
  check_screen_args(tokens, x, screen, coef, head);
  const int64_t M = x.size(0), K = x.size(1), V = head.size(0), Kp = head.size(1);
  if (M == 0) {
    return true;
  }
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<double> xn(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double v = bf16_value(xs[m * K + k]);
      sum += v * v;
    }
    xn[m] = std::sqrt(sum);
    if (!std::isfinite(xn[m]) || !(xn[m] * max_norm <= SAFE_MAGNITUDE)) {
      return false;
    }
  }
  at::Tensor a = at::empty({M, V}, x.options());
  gemv_int8(a, x, screen, std::nullopt, false, true);
  const auto* av = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  const float* c = coef.data_ptr<float>();
  // Row n's bound for x's row m: xm * c[n] + |a| * SLACK + tiny, with xm = |x_m|_2 (1 + SLACK),
  // in fp32: its own rounding (2^-24 of each term) is far inside SLACK's margin.
  constexpr float slack = static_cast<float>(SLACK);
  const float tiny_f = static_cast<float>(tiny);
  // Each row's floor: the largest a - bound (every candidate's a + bound reaches it).
  const int64_t chunks = (V + CHUNK - 1) / CHUNK;
  std::vector<float> part(static_cast<size_t>(M * chunks));
  at::parallel_for(0, M * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / chunks, n0 = (i % chunks) * CHUNK, n1 = std::min(V, n0 + CHUNK);
      const float xm = static_cast<float>(xn[m] * (1 + SLACK));
      const uint16_t* am = av + m * V;
      float best = -INFINITY;
#pragma omp simd reduction(max : best)
      for (int64_t n = n0; n < n1; ++n) {
        const float an = bf16_value(am[n]);
        const float low = an - (xm * c[n] + std::fabs(an) * slack + tiny_f);
        best = low > best ? low : best;
      }
      part[i] = best;
    }
  });
  std::vector<float> floor(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    floor[m] = *std::max_element(part.begin() + m * chunks, part.begin() + (m + 1) * chunks);
    if (!std::isfinite(floor[m])) {  // a logit of the screen not finite
      return false;
    }
  }
  // The tiles holding a candidate of any row of x (a NaN logit is one): a + bound >= floor.
  const int64_t tiles = (V + TILE - 1) / TILE;
  std::vector<uint8_t> used(static_cast<size_t>(tiles));
  at::parallel_for(0, tiles, CHUNK / TILE, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE, n1 = std::min(V, n0 + TILE);
      uint8_t any = 0;
      for (int64_t m = 0; m < M; ++m) {
        const float xm = static_cast<float>(xn[m] * (1 + SLACK)), fm = floor[m];
        const uint16_t* am = av + m * V;
#pragma omp simd reduction(| : any)
        for (int64_t n = n0; n < n1; ++n) {
          const float an = bf16_value(am[n]);
          any |= static_cast<uint8_t>(!(an + (xm * c[n] + std::fabs(an) * slack + tiny_f) < fm));
        }
      }
      used[t] = any;
    }
  });
  // Their tiles, gathered in vocabulary order into a head of their own (every tile full but a
  // last, narrower one: the layout gemv_bf16 reads), and computed as the full head would. The
  // argmax runs over every row gathered: a row that is no candidate has a bf16 logit below the
  // floor (within its bound of a + bound < floor), and the floor is at most the best's, so it
  // can neither win nor tie.
  std::vector<int64_t> first;  // the first vocabulary row of each gathered tile
  for (int64_t t = 0; t < tiles; ++t) {
    if (used[t]) {
      first.push_back(t * TILE);
    }
  }
  if (first.empty()) {  // not reached: the row that sets a floor is its candidate
    return false;
  }
  const int64_t rows = static_cast<int64_t>(first.size() - 1) * TILE +
                       std::min(TILE, V - first.back());
  at::Tensor sub = at::empty({rows, Kp, 2}, head.options());
  const auto* hs = reinterpret_cast<const uint16_t*>(head.data_ptr<at::BFloat16>());
  auto* ss = reinterpret_cast<uint16_t*>(sub.data_ptr<at::BFloat16>());
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t width = std::min(TILE, V - first[i]);
    std::memcpy(ss + static_cast<int64_t>(i) * TILE * Kp * 2, hs + first[i] * Kp * 2,
                static_cast<size_t>(width * Kp * 2) * sizeof(uint16_t));
  }
  at::Tensor exact = at::empty({M, rows}, x.options());
  gemv_bf16(exact, x, sub, std::nullopt, false, true);
  const auto* ev = reinterpret_cast<const uint16_t*>(exact.data_ptr<at::BFloat16>());
  auto* out = tokens.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    float best = -INFINITY;
    int64_t at = -1;
    for (int64_t r = 0; r < rows; ++r) {
      const float v = bf16_value(ev[m * rows + r]);
      if (!std::isfinite(v)) {  // the full head's argmax rules for NaN and inf: not here
        return false;
      }
      if (at < 0 || v > best) {
        best = v;
        at = first[r / TILE] + r % TILE;
      }
    }
    out[m] = at;
  }
  return true;
}

}  // namespace peftserve_cpu

TORCH_LIBRARY_FRAGMENT(peftserve_cpu, m) {
  m.def(
      "screened_argmax(Tensor(a!) tokens, Tensor x, Tensor screen, Tensor coef, Tensor head, "
      "float max_norm, float tiny) -> bool");
}

TORCH_LIBRARY_IMPL(peftserve_cpu, CPU, m) {
  m.impl("screened_argmax", &peftserve_cpu::screened_argmax);
}
