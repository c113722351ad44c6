// The CPU ops of this library, callable from each other's C++ (decode_forward_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

namespace peftserve_cpu {

void paged_decode_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            int64_t block_size, double scale, bool generic);
void rms_norm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(const at::Tensor& out, const at::Tensor& residual, const at::Tensor& x,
                  const at::Tensor& weight, double eps);
void rotary_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& cache, const at::Tensor& slot_mapping, int64_t heads,
                      int64_t kv_heads);
void silu_and_mul(const at::Tensor& out, const at::Tensor& gate_up);
void lora_rows(const at::Tensor& y, const at::Tensor& x, const std::optional<at::Tensor>& rows,
               at::IntArrayRef bounds, at::TensorList A, at::TensorList B_blocks,
               at::IntArrayRef ranks, at::IntArrayRef offsets);
void bottleneck_rows(const at::Tensor& y, const std::optional<at::Tensor>& rows,
                     at::IntArrayRef bounds, at::TensorList A, at::TensorList b_down,
                     at::TensorList B_t, at::TensorList b_up, at::ArrayRef<double> scales,
                     int64_t act);
void gemv_bf16(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
               const std::optional<at::Tensor>& bias, bool generic, bool amx);
bool gemv_bf16_amx();
void gemv_int8(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
               const std::optional<at::Tensor>& bias, bool generic, bool amx);
void gemv_int4(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
               const std::optional<at::Tensor>& bias, bool generic, bool amx);

}  // namespace peftserve_cpu
