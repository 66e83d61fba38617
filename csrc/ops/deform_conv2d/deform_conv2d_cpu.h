// CPU kernel table of deformable convolution (compiled once per CPU capability).
#pragma once

#include <ATen/core/Tensor.h>

#include "tokenmix/cpu_capability.h"
#include "tokenmix/deform_math.h"

namespace tokenmix {
namespace deform {

// Checked operands: input [B, Cin, H, W], offset [B, 2 G kk, Ho, Wo], weight
// [Cout, Cin / groups, kh, kw], optional bias [Cout] and mask [B, G kk, Ho, Wo]; all contiguous.
struct Problem {
  at::Tensor input, offset, weight, bias, mask;
  Geometry geo;
  int64_t groups, offset_groups;
};

struct CpuKernels {
  // out [B, Cout, Ho, Wo] contiguous.
  void (*forward)(const Problem& p, at::Tensor& out);
  // grad [B, Cout, Ho, Wo] contiguous; outputs preallocated like their inputs (grad_mask and
  // grad_bias undefined when there is no mask / bias).
  void (*backward)(const Problem& p, const at::Tensor& grad, at::Tensor& grad_input,
                   at::Tensor& grad_offset, at::Tensor& grad_weight, at::Tensor& grad_bias,
                   at::Tensor& grad_mask);
};

TM_DECLARE_CPU_KERNELS(deform_conv2d, CpuKernels)

}  // namespace deform
}  // namespace tokenmix
