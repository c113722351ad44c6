// Argument checks shared by the CPU ops: every op checks what it will dereference (dtypes,
// shapes, strides, layouts, index ranges, list lengths) before it touches memory, and raises
// a RuntimeError naming the op and the argument otherwise.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace peftserve_cpu {

// A dense CPU tensor: its data_ptr is host memory laid out by its strides.
inline void check_dense_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name,
              " must be a dense CPU tensor, got ", t.device(), " ", t.layout());
}

// Rows of a [T, n] tensor that its writers may update in parallel must not overlap.
inline void check_rows_apart(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": ", name,
              " rows overlap (row stride ", t.stride(0), " < width ", t.size(1), ")");
}

// A linear op's out [M, N] (M = x's rows) with contiguous rows apart, and an optional
// contiguous bfloat16 bias [N].
inline void check_linear_out(const at::Tensor& out, const at::Tensor& x, int64_t n,
                             const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n &&
                  (out.size(1) <= 1 || out.stride(1) == 1),
              op, ": out must be [M, N] = [", x.size(0), ", ", n,
              "] with contiguous rows, got sizes ", out.sizes(), " strides ", out.strides());
  check_rows_apart(out, op, "out");
  if (bias.has_value()) {
    check_dense_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                    bias->size(0) == n && bias->is_contiguous(),
                op, ": bias must be a contiguous bfloat16 [N] = [", n, "], got ",
                bias->scalar_type(), " ", bias->sizes());
  }
}

}  // namespace peftserve_cpu
