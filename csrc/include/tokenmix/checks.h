// Argument checks shared by every op. Each message names the op, the argument, what was expected
// and what was received, and raises the Python exception a PyTorch user would expect:
// ValueError for shapes, ranks, sizes and devices, TypeError for dtypes, IndexError for indices.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace tokenmix {

std::string shape_str(const at::Tensor& t);

// t.dim() == rank; `layout` names the dimensions for the message, e.g. "[B, N, C]".
void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                const char* layout);
// float32, float16, bfloat16 or float64.
void check_floating(const char* op, const char* name, const at::Tensor& t);
void check_int64(const char* op, const char* name, const at::Tensor& t);
void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref);
void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref);
// t.size(dim) == expected; `what` says where the expectation comes from, e.g. "x.size(0)".
void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                int64_t expected, const char* what);
// 0 <= index < upper for every entry. On CUDA this reads two scalars back (one sync): the price
// of raising an IndexError instead of a device-side assert that poisons the CUDA context.
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t upper);

// A view whose last dim has unit stride: returned as is, else made contiguous.
at::Tensor with_unit_channel_stride(const at::Tensor& t);

// An int[2] schema argument (h, w); raises if it does not have two entries.
std::pair<int64_t, int64_t> int_pair(const char* op, const char* name, at::IntArrayRef v);

// The type kernels accumulate in: float64 for float64 inputs, float32 for every other float.
at::ScalarType acc_scalar_type(at::ScalarType t);

}  // namespace tokenmix
