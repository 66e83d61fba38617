// What both devices of HorNet's recursive gated convolution share: the checked problem, its
// gradients and the kernel table (gnconv.cpp builds the problem and allocates the outputs;
// gnconv_cpu.cpp and gnconv_cuda.cpp implement the table).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "gnconv_math.h"
#include "tokenmix/kernel_table.h"

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

struct Kernels {
  // out [B, dim, H, W] in x's memory format.
  void (*forward)(const Problem& p, at::Tensor& out);
  // grad like out, dense in x's memory format.
  void (*backward)(const Problem& p, const at::Tensor& grad, Grads& g);
};

TM_DECLARE_KERNELS(gnconv, Kernels)

}  // namespace gnconv
}  // namespace tokenmix
