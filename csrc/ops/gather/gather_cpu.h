// CPU kernel table of the sparse-token gather family. gather_cpu.cpp is compiled once per CPU
// capability; gather.cpp calls gather_cpu_kernels(), which picks the build this processor runs.
// Inputs are already checked, contiguous where gather.cpp says so, and outputs preallocated.
#pragma once

#include <ATen/core/Tensor.h>

#include "tokenmix/cpu_capability.h"
#include "tokenmix/gather_math.h"

namespace tokenmix {
namespace gather {

struct CpuKernels {
  void (*gather_rows)(const at::Tensor& x, const at::Tensor& index, at::Tensor& out);
  void (*build_inverse)(const at::Tensor& index, at::Tensor& count, at::Tensor& first);
  void (*compose_rows)(RowMode mode, const at::Tensor& rows, const at::Tensor& self,
                       const at::Tensor& index, const at::Tensor& count, const at::Tensor& first,
                       at::Tensor& out);
  void (*topk_index)(const at::Tensor& score, int64_t k, int64_t keep_first, at::Tensor& index);
  void (*policy_forward)(const at::Tensor& logits, const at::Tensor& policy, double eps,
                         at::Tensor& out);
  void (*policy_backward)(const at::Tensor& grad_out, const at::Tensor& logits,
                          const at::Tensor& policy, double eps, at::Tensor& grad_logits,
                          at::Tensor& grad_policy);
};

TM_DECLARE_CPU_KERNELS(gather, CpuKernels)

}  // namespace gather
}  // namespace tokenmix
