// The CUDA side of the shifted / rearranged token-mixing family, host half: each primitive of
// shift_problem.h fills its torch-free params struct (shift_params.h) from the tensors and
// launches the kernels of shift_cuda.cu (gather, unfold) or shift_gemm.cu (linear, weight_grad)
// on the current stream. The weight gradient's per-chunk partials come from the caching
// allocator. Built only with CUDA.

#include <ATen/ATen.h>

#include "shift_params.h"
#include "shift_args.h"
#include "shift_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/cuda_launch.h"

namespace tokenmix {
namespace shift {
namespace {

// The kernels read weight and bias as contiguous arrays of the accumulation type: shift.cpp hands
// them over in that type, linear makes the weight contiguous (the backward passes W^T as a
// transposed view), and this keeps a future caller from handing them anything else.
void check_param(const char* what, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == acc_scalar_type(x.scalar_type()) && t.is_contiguous() &&
                  t.device() == x.device(),
              "tokenmix shift (CUDA): ", what, " must be a contiguous ",
              acc_scalar_type(x.scalar_type()), " tensor on ", x.device(), ", got ",
              t.scalar_type(), " on ", t.device());
}

void gather(const at::Tensor& src, const TokenMap& map, at::Tensor& out) {
  GatherParams p{};
  p.src = src.const_data_ptr();
  p.src_st = strides_of(src);
  p.map = map;
  p.out = out.mutable_data_ptr();
  p.out_st = strides_of(out);
  p.B = src.size(0);
  p.dtype = to_dtype(src.scalar_type());
  check_launch(shift_gather_cuda(p, current_stream()), "shift_gather");
}

void unfold(const at::Tensor& grid, const TokenMap& map, at::Tensor& out) {
  UnfoldParams p{};
  p.grid = grid.const_data_ptr();
  p.grid_st = strides_of(grid);
  p.map = map;
  p.out = out.mutable_data_ptr();
  p.out_st = strides_of(out);
  p.B = grid.size(0);
  p.dtype = to_dtype(grid.scalar_type());
  check_launch(shift_unfold_cuda(p, current_stream()), "shift_unfold");
}

void linear(const at::Tensor& src, const TokenMap& in_map, const at::Tensor& weight,
            const at::Tensor& bias, const TokenMap& out_map, at::Tensor& out) {
  const at::Tensor w = weight.contiguous();
  check_param("weight", w, src);
  if (bias.defined()) check_param("bias", bias, src);
  LinearParams p{};
  p.src = src.const_data_ptr();
  p.src_st = strides_of(src);
  p.in_map = in_map;
  p.weight = w.const_data_ptr();
  p.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.out_st = strides_of(out);
  p.out_map = out_map;
  p.B = src.size(0);
  p.J = w.size(0);
  p.K = in_map.K();
  p.GH = in_map.GH();
  p.GW = in_map.GW();
  p.dtype = to_dtype(src.scalar_type());
  check_launch(shift_linear_cuda(p, current_stream()), "shift_linear");
}

void weight_grad(const at::Tensor& grad, const TokenMap& g_map, const at::Tensor& src,
                 const TokenMap& a_map, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  check_param("grad_weight", grad_weight, src);
  check_param("grad_bias", grad_bias, src);
  WeightGradParams p{};
  p.grad = grad.const_data_ptr();
  p.grad_st = strides_of(grad);
  p.g_map = g_map;
  p.src = src.const_data_ptr();
  p.src_st = strides_of(src);
  p.a_map = a_map;
  p.B = src.size(0);
  p.J = g_map.K();
  p.K = a_map.K();
  p.GH = a_map.GH();
  p.GW = a_map.GW();
  p.dtype = to_dtype(src.scalar_type());
  const int64_t N = p.B * p.GH * p.GW;
  if (N == 0 || p.J == 0) {
    grad_weight.zero_();  // the sum over no pixel
    grad_bias.zero_();
    return;
  }
  p.chunks = shift_weight_grad_chunks(p.J, p.K, N);
  at::Tensor partial = at::empty({p.chunks, p.J * p.K + p.J}, grad_weight.options());
  p.partial = partial.mutable_data_ptr();
  p.grad_weight = grad_weight.mutable_data_ptr();
  p.grad_bias = grad_bias.mutable_data_ptr();
  check_launch(shift_weight_grad_cuda(p, current_stream()), "shift_weight_grad");
}

}  // namespace

TM_DEFINE_KERNELS(shift_cuda_kernels, &gather, &unfold, &linear, &weight_grad)

}  // namespace shift
}  // namespace tokenmix
