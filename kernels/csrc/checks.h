// Argument checks shared by the CPU ops: every op checks what it will dereference (dtypes,
// shapes, strides, layouts, index ranges, list lengths) before it touches memory, and raises
// a RuntimeError naming the op and the argument otherwise.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace peftserve_cpu
