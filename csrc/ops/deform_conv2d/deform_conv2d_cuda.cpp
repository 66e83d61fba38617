// The CUDA side of deformable convolution, host half. fp16/bf16 forwards with one weight group:
// one fused kernel (sampling into tensor-core tiles). Otherwise, and for every backward: the
// sampling kernels of deform_conv2d_cuda.cu around cuBLAS GEMMs (ATen, current stream), over
// chunks of images whose column buffer stays under kWorkspaceBytes. TOKENMIX_DEFORM_FUSED=0
// forces the second form, for comparison. Built only with CUDA.

#include <ATen/ATen.h>

#include <algorithm>

#include "deform_conv2d_params.h"
#include "deform_conv2d_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/cuda_launch.h"
#include "tokenmix/env.h"

namespace tokenmix {
namespace deform_conv2d {
namespace {

constexpr int64_t kWorkspaceBytes = int64_t{256} << 20;

DeformParams params(const Problem& p) {
  DeformParams d{};
  d.input = p.input.const_data_ptr();
  d.offset = p.offset.const_data_ptr();
  d.mask = p.mask.defined() ? p.mask.const_data_ptr() : nullptr;
  d.geo = p.geo;
  d.Cin = p.input.size(1);
  d.G = p.offset_groups;
  d.dtype = to_dtype(p.input.scalar_type());
  return d;
}

// Images per chunk: as many as keep the column buffer under kWorkspaceBytes, at least one.
int64_t chunk(const Problem& p) {
  const int64_t per_image = p.input.size(1) * p.geo.taps() * p.geo.Ho * p.geo.Wo *
                            p.input.element_size();
  return std::max<int64_t>(1, std::min<int64_t>(p.input.size(0), kWorkspaceBytes / per_image));
}

// weight as [1, groups, Cout_g, Cin_g * kk], the layout the column rows (c * kk + tap) match.
at::Tensor weight4(const Problem& p) {
  return p.weight.reshape({1, p.groups, p.weight.size(0) / p.groups, -1});
}

at::Tensor im2col(const Problem& p, DeformParams& d, int64_t b0, int64_t nb) {
  const int64_t Kg = p.weight.size(1) * p.geo.taps();
  at::Tensor cols = at::empty({nb, p.groups, Kg, p.geo.Ho * p.geo.Wo}, p.input.options());
  d.b0 = b0;
  d.nb = nb;
  d.cols = cols.mutable_data_ptr();
  check_launch(deform_im2col_cuda(d, current_stream()), "deform_im2col");
  return cols;
}

bool fused_forward(const Problem& p, DeformParams& d, at::Tensor& out) {
  static const bool enabled = env_enabled("TOKENMIX_DEFORM_FUSED");
  d.b0 = 0;
  d.nb = p.input.size(0);
  d.Cout = p.weight.size(0);
  if (!enabled || !deform_forward_fused_supported(d, p.groups)) return false;
  // [Cout, Cin, kh, kw] -> [Cout, kh, kw, Cin]: the tap-major columns of ImplicitGemm.
  const at::Tensor wt = p.weight.permute({0, 2, 3, 1}).reshape({p.weight.size(0), -1}).contiguous();
  d.weight_tk = wt.const_data_ptr();
  d.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  d.out = out.mutable_data_ptr();
  check_launch(deform_forward_fused_cuda(d, current_stream()), "deform_forward_fused");
  return true;
}

void forward(const Problem& p, at::Tensor& out) {
  DeformParams d = params(p);
  if (fused_forward(p, d, out)) return;
  const int64_t B = p.input.size(0), step = chunk(p), groups = p.groups;
  const int64_t Cout = p.weight.size(0), P = p.geo.Ho * p.geo.Wo;
  const int64_t Cout_g = Cout / groups, Kg = p.weight.size(1) * p.geo.taps();
  const at::Tensor w4 = weight4(p);
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t nb = std::min(step, B - b0);
    const at::Tensor cols = im2col(p, d, b0, nb).view({nb * groups, Kg, P});
    // One batched GEMM per chunk straight into the output, the bias broadcast in as its C term.
    at::Tensor dst = out.narrow(0, b0, nb).view({nb * groups, Cout_g, P});
    const at::Tensor w3 = w4.expand({nb, groups, Cout_g, Kg}).reshape({nb * groups, Cout_g, Kg});
    if (p.bias.defined()) {
      const at::Tensor b3 = p.bias.view({1, groups, Cout_g, 1})
                                .expand({nb, groups, Cout_g, 1})
                                .reshape({nb * groups, Cout_g, 1});
      at::baddbmm_out(dst, b3, w3, cols);
    } else {
      at::bmm_out(dst, w3, cols);
    }
  }
}

void backward(const Problem& p, const at::Tensor& grad, at::Tensor& gi, at::Tensor& go,
              at::Tensor& gw, at::Tensor& gb, at::Tensor& gm) {
  DeformParams d = params(p);
  const int64_t B = p.input.size(0), step = chunk(p), groups = p.groups;
  const int64_t Cout = p.weight.size(0), P = p.geo.Ho * p.geo.Wo;
  const auto acc = acc_scalar_type(p.input.scalar_type());
  at::Tensor gi_acc = at::zeros(p.input.sizes(), p.input.options().dtype(acc));
  at::Tensor gw_acc = at::zeros({groups, Cout / groups, p.weight.size(1) * p.geo.taps()},
                                p.input.options().dtype(acc));
  const at::Tensor w4t = weight4(p).transpose(-1, -2);
  d.grad_input = gi_acc.mutable_data_ptr();
  d.grad_offset = go.mutable_data_ptr();
  d.grad_mask = gm.defined() ? gm.mutable_data_ptr() : nullptr;
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t nb = std::min(step, B - b0);
    const at::Tensor cols = im2col(p, d, b0, nb);
    const at::Tensor g = grad.narrow(0, b0, nb).view({nb, groups, Cout / groups, P});
    const at::Tensor gcols = at::matmul(w4t, g).contiguous();
    gw_acc.add_(at::matmul(g, cols.transpose(-1, -2)).to(acc).sum(0));
    d.grad_cols = gcols.const_data_ptr();
    check_launch(deform_col2im_cuda(d, current_stream()), "deform_col2im");
    check_launch(deform_col2im_coord_cuda(d, current_stream()), "deform_col2im_coord");
  }
  gi.copy_(gi_acc);
  gw.copy_(gw_acc.view(gw.sizes()));
  if (gb.defined()) gb.copy_(grad.sum({0, 2, 3}));
}

}  // namespace

TM_DEFINE_KERNELS(deform_conv2d_cuda_kernels, &forward, &backward)

}  // namespace deform_conv2d
}  // namespace tokenmix
