// What both devices of deformable convolution share: the checked problem and the kernel table
// (deform_conv2d.cpp builds the problem and allocates the outputs; deform_conv2d_cpu.cpp and
// deform_conv2d_cuda.cpp implement the table).
#pragma once

#include <ATen/core/Tensor.h>

#include "deform_conv2d_math.h"
#include "tokenmix/kernel_table.h"

namespace tokenmix {
namespace deform_conv2d {

// Checked operands: input [B, Cin, H, W], offset [B, 2 G kk, Ho, Wo], weight
// [Cout, Cin / groups, kh, kw], optional bias [Cout] and mask [B, G kk, Ho, Wo]; all contiguous.
struct Problem {
  at::Tensor input, offset, weight, bias, mask;
  Geometry geo;
  int64_t groups, offset_groups;
};

struct Kernels {
  // out [B, Cout, Ho, Wo] contiguous.
  void (*forward)(const Problem& p, at::Tensor& out);
  // grad [B, Cout, Ho, Wo] contiguous; outputs preallocated like their inputs (grad_mask and
  // grad_bias undefined when there is no mask / bias).
  void (*backward)(const Problem& p, const at::Tensor& grad, at::Tensor& grad_input,
                   at::Tensor& grad_offset, at::Tensor& grad_weight, at::Tensor& grad_bias,
                   at::Tensor& grad_mask);
};

TM_DECLARE_KERNELS(deform_conv2d, Kernels)

}  // namespace deform_conv2d
}  // namespace tokenmix
