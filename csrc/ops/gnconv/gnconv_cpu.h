// CPU kernel table of HorNet's recursive gated convolution (compiled once per CPU capability).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "tokenmix/cpu_capability.h"
#include "tokenmix/gnconv_math.h"

namespace tokenmix {
namespace gnconv {

// Checked operands, all in x's dtype and on its device. x [B, dim, H, W] is dense in NCHW or
// channels_last (its suggested memory format); the weights are contiguous in their Conv2d
// shapes: w_in [2 dim, dim, 1, 1], w_dw [S, 1, k, k], w_pw[i] [dims[i+1], dims[i], 1, 1],
// w_out [dim, dim, 1, 1], each bias 1-D.
struct Problem {
  at::Tensor x, w_in, b_in, w_dw, b_dw, w_out, b_out;
  std::vector<at::Tensor> w_pw, b_pw;
  Layout lay;
  DwGeometry geo;
  double scale;
};

// Gradients, preallocated like their operands (grad_x in x's memory format).
struct Grads {
  at::Tensor x, w_in, b_in, w_dw, b_dw, w_out, b_out;
  std::vector<at::Tensor> w_pw, b_pw;
};

struct CpuKernels {
  // out [B, dim, H, W] in x's memory format.
  void (*forward)(const Problem& p, at::Tensor& out);
  // grad like out, dense in x's memory format.
  void (*backward)(const Problem& p, const at::Tensor& grad, Grads& g);
};

TM_DECLARE_CPU_KERNELS(gnconv, CpuKernels)

}  // namespace gnconv
}  // namespace tokenmix
