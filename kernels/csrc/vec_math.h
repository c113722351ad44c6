// Small math helpers shared by the CPU kernels, written so `omp simd` loops vectorize them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

namespace peftserve_cpu {

// exp for x <= 0 (softmax after subtracting the max), Cephes' expf polynomial: within 2 ulp of
// std::exp on [-87, 0], and written so `omp simd` loops vectorize it (glibc's expf does not).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// sigmoid(x) from exp(-|x|), which never overflows.
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::abs(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// Loads, stores and rounds of the kernels' element types through fp32. bf16 goes by its bits
// (round to nearest even, NaN kept a quiet NaN), so that loops over it vectorize; the other
// types use c10's conversions.
template <typename scalar_t>
struct Fp32 {
  static inline float load(const scalar_t* p, int64_t i) { return static_cast<float>(p[i]); }
  static inline void store(scalar_t* p, int64_t i, float x) { p[i] = static_cast<scalar_t>(x); }
  static inline float round(float x) { return static_cast<float>(static_cast<scalar_t>(x)); }
};

inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0u)
                                         : static_cast<uint16_t>(rounded);
}

inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

template <>
struct Fp32<c10::BFloat16> {
  static inline float load(const c10::BFloat16* p, int64_t i) {
    return bf16_value(reinterpret_cast<const uint16_t*>(p)[i]);
  }
  static inline void store(c10::BFloat16* p, int64_t i, float x) {
    reinterpret_cast<uint16_t*>(p)[i] = bf16_bits(x);
  }
  static inline float round(float x) { return bf16_value(bf16_bits(x)); }
};

}  // namespace peftserve_cpu
