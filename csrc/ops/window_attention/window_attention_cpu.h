// CPU kernel table of windowed attention (compiled once per CPU capability, see cpu_capability.h).
// Inputs are checked by window_attention.cpp; outputs are preallocated there.
#pragma once

#include <ATen/core/Tensor.h>

#include "tokenmix/cpu_capability.h"
#include "tokenmix/window_math.h"

namespace tokenmix {
namespace window {

// q is [B, H, W, heads, d], or [B, wh, ww, heads, d] when global_q; k, v are [B, H, W, heads, d];
// every tensor has a unit stride in its last dim. bias_table may be undefined.
struct Problem {
  at::Tensor q, k, v, bias_table;
  Geometry geo;
  double scale;
  bool global_q;
};

struct CpuKernels {
  // out [B, H, W, heads, d] contiguous; lse [B, windows, tokens, heads] in the accumulation type,
  // or undefined when no backward will need it.
  void (*forward)(const Problem& p, at::Tensor& out, at::Tensor& lse);
  // grad [B, H, W, heads, d] contiguous. dq, dk, dv contiguous, shaped like q, k, v;
  // dbias [(2wh-1)(2ww-1), heads] when bias_table is defined.
  void (*backward)(const Problem& p, const at::Tensor& grad, const at::Tensor& lse, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias);
};

TM_DECLARE_CPU_KERNELS(window_attention, CpuKernels)

}  // namespace window
}  // namespace tokenmix
