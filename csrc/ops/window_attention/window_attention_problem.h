// What both devices of windowed attention share: the checked problem and the kernel table
// (window_attention.cpp builds the problem and allocates the outputs; window_attention_cpu.cpp and
// window_attention_cuda.cpp implement the table).
#pragma once

#include <ATen/core/Tensor.h>

#include "tokenmix/kernel_table.h"
#include "window_attention_math.h"

namespace tokenmix {
namespace window_attention {

constexpr const char* kOp = "window_attention";

// q is [B, H, W, heads, d], or [B, wh, ww, heads, d] when global_q; k, v are [B, H, W, heads, d];
// every tensor has a unit stride in its last dim. bias_table may be undefined.
struct Problem {
  at::Tensor q, k, v, bias_table;
  Geometry geo;
  double scale;
  bool global_q;
};

struct Kernels {
  // out [B, H, W, heads, d] contiguous; lse [B, windows, tokens, heads] in the accumulation type,
  // or undefined when no backward will need it.
  void (*forward)(const Problem& p, at::Tensor& out, at::Tensor& lse);
  // grad [B, H, W, heads, d] contiguous. dq, dk, dv contiguous, shaped like q, k, v;
  // dbias [(2wh-1)(2ww-1), heads] when bias_table is defined.
  void (*backward)(const Problem& p, const at::Tensor& grad, const at::Tensor& lse, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias);
};

TM_DECLARE_KERNELS(window_attention, Kernels)

}  // namespace window_attention
}  // namespace tokenmix
