// What both devices of the shifted / rearranged token-mixing family share: the kernel table of the
// four primitives every op is composed from (shift.cpp composes them; shift_cpu.cpp and
// shift_cuda.cpp implement them). Tensors reach the primitives checked, [B, C, H, W] with any
// strides, outputs preallocated; a TokenMap (shift_math.h) says how a grid is read from a source.
#pragma once

#include <ATen/core/Tensor.h>

#include "shift_math.h"
#include "tokenmix/kernel_table.h"

namespace tokenmix {
namespace shift {

struct Kernels {
  // out = the grid read from src through map: out[b, k, gy, gx] = src[source_offset(...)], 0
  // where the map reads zero. out [B, K, GH, GW] of the map.
  void (*gather)(const at::Tensor& src, const TokenMap& map, at::Tensor& out);
  // The inverse of a fold map (map.kind == Fold): out[b, c, ...] (the source's shape) = the grid
  // element at padded position fold_target(i), plus, with map.wrap, its padded copy (the fold's
  // adjoint). Every output element is written.
  void (*unfold)(const at::Tensor& grid, const TokenMap& map, at::Tensor& out);
  // The 1x1 projection of a mapped operand, stored through a map:
  //   R[b, j, gy, gx] = bias[j] + sum_k weight[j, k] A[b, k, gy, gx],  A read from src via in_map;
  //   R is written to out itself (out_map Identity) or to out[source_offset(out_map, ...)], the
  //   grid elements whose offset is -1 dropped (out_map a Shift, or a Fold without wrap). Each
  //   output element is written at most once; the caller zeroes out where some are not written.
  // weight [J, K] in the accumulation type (acc_scalar_type), its rows or its columns contiguous
  // (the backward passes W^T as a transposed view); bias [J] in it, or undefined.
  void (*linear)(const at::Tensor& src, const TokenMap& in_map, const at::Tensor& weight,
                 const at::Tensor& bias, const TokenMap& out_map, at::Tensor& out);
  // Weight and bias gradients of linear with an Identity out_map:
  //   grad_weight[j, k] = sum_{b, gy, gx} G[b, j, gy, gx] A[b, k, gy, gx],
  //   grad_bias[j] = sum G[b, j, gy, gx],
  // G read from grad via g_map, A from src via a_map. grad_weight [J, K] and grad_bias [J]
  // contiguous, in the accumulation type, overwritten (zero when there is no pixel). Summed in a
  // fixed order: the same bits at any thread count.
  void (*weight_grad)(const at::Tensor& grad, const TokenMap& g_map, const at::Tensor& src,
                      const TokenMap& a_map, at::Tensor& grad_weight, at::Tensor& grad_bias);
};

TM_DECLARE_KERNELS(shift, Kernels)

}  // namespace shift
}  // namespace tokenmix
