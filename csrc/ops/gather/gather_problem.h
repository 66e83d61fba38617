// What both devices of the sparse-token gather family share: the kernel table of the row
// primitives every op is composed from (gather.cpp composes them; gather_cpu.cpp and
// gather_cuda.cpp implement them). Inputs reach the primitives checked, with the layouts their
// comments state, and outputs preallocated.
#pragma once

#include <ATen/core/Tensor.h>

#include "gather_math.h"
#include "tokenmix/kernel_table.h"

namespace tokenmix {
namespace gather {

// The inverse map of an index [B, K] over N positions (gather_math.h), int32 [B, N] each.
struct Inverse {
  at::Tensor count, first;
};

struct Kernels {
  // out[b, k, :] = x[b, index[b, k], :]; x [B, N, C] with a unit channel stride, index [B, K]
  // int64 contiguous, out [B, K, C] contiguous.
  void (*gather_rows)(const at::Tensor& x, const at::Tensor& index, at::Tensor& out);
  // The inverse map of index over N positions, allocated here.
  Inverse (*inverse)(const at::Tensor& index, int64_t N);
  // out [B, N, C] contiguous, row by row as row_source(mode, count) says: rows [B, K, C]
  // contiguous (GatherBackward, Scatter), self [B, N, C] with a unit channel stride (Scatter,
  // ScatterBackward); the operand a mode does not read may be undefined.
  void (*compose)(RowMode mode, const at::Tensor& rows, const at::Tensor& self,
                  const at::Tensor& index, const Inverse& inv, at::Tensor& out);
  // index[b, :keep_first] = 0..keep_first-1, then the k best of score [B, M] (contiguous) in
  // ranks_before order, shifted by keep_first; index [B, keep_first + k] int64.
  void (*topk_index)(const at::Tensor& score, int64_t k, int64_t keep_first, at::Tensor& index);
  // policy_softmax of logits [B, H, N, N] with policy [B, N], both contiguous in one dtype.
  void (*policy_forward)(const at::Tensor& logits, const at::Tensor& policy, double eps,
                         at::Tensor& out);
  // Its gradients; grad like logits, grad_policy [B, N] zeroed.
  void (*policy_backward)(const at::Tensor& grad, const at::Tensor& logits,
                          const at::Tensor& policy, double eps, at::Tensor& grad_logits,
                          at::Tensor& grad_policy);
};

TM_DECLARE_KERNELS(gather, Kernels)

}  // namespace gather
}  // namespace tokenmix
