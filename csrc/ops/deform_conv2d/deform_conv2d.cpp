// Deformable convolution (DCNv1/v2 as torchvision.ops.deform_conv2d, used by LIT's token
// merging): argument checks, the CPU and CUDA backends, C++ autograd and the dispatcher
// registrations. Schemas live in csrc/tokenmix.cpp.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "deform_conv2d_cpu.h"
#include "tokenmix/checks.h"
#include "tokenmix/autocast.h"
#include "tokenmix/op_handle.h"

#if defined(TOKENMIX_WITH_CUDA)
#include "deform_conv2d_params.h"
#include "tokenmix/cuda_launch.h"
#include "tokenmix/env.h"
#endif

namespace tokenmix {
namespace deform {
namespace {

constexpr const char* kOp = "deform_conv2d";

Problem make_problem(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation,
                     const std::optional<at::Tensor>& mask) {
  check_rank(kOp, "input", input, 4, "[B, C_in, H, W]");
  check_floating(kOp, "input", input);
  check_rank(kOp, "offset", offset, 4, "[B, 2 * offset_groups * kh * kw, H_out, W_out]");
  check_rank(kOp, "weight", weight, 4, "[C_out, C_in / groups, kh, kw]");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"offset", &offset},
                                {"weight", &weight}}) {
    check_same_dtype(kOp, name, *t, "input", input);
    check_same_device(kOp, name, *t, "input", input);
  }
  const auto [sh, sw] = int_pair(kOp, "stride", stride);
  const auto [ph, pw] = int_pair(kOp, "padding", padding);
  const auto [dh, dw] = int_pair(kOp, "dilation", dilation);
  TORCH_CHECK_VALUE(sh > 0 && sw > 0, "tokenmix.", kOp, ": stride must be positive, got (", sh,
                    ", ", sw, ")");
  TORCH_CHECK_VALUE(dh > 0 && dw > 0, "tokenmix.", kOp, ": dilation must be positive, got (", dh,
                    ", ", dw, ")");
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0, "tokenmix.", kOp, ": padding must be >= 0, got (", ph,
                    ", ", pw, ")");
  const int64_t B = input.size(0), Cin = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t Cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(kh > 0 && kw > 0 && weight.size(1) > 0, "tokenmix.", kOp,
                    ": weight must have a non-empty kernel, got ", shape_str(weight));
  const int64_t Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) / sh + 1;
  const int64_t Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) / sw + 1;
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "tokenmix.", kOp, ": the output size (", Ho, ", ", Wo,
                    ") is not positive for input (", H, ", ", W, "), kernel (", kh, ", ", kw,
                    "), stride (", sh, ", ", sw, "), padding (", ph, ", ", pw, "), dilation (", dh,
                    ", ", dw, ")");
  TORCH_CHECK_VALUE(Cin % weight.size(1) == 0, "tokenmix.", kOp, ": input channels ", Cin,
                    " must be a multiple of weight.size(1) = ", weight.size(1));
  const int64_t groups = Cin / weight.size(1);
  TORCH_CHECK_VALUE(Cout % groups == 0, "tokenmix.", kOp, ": weight.size(0) = ", Cout,
                    " must be a multiple of the ", groups, " weight groups");
  const int64_t kk = kh * kw;
  TORCH_CHECK_VALUE(offset.size(1) > 0 && offset.size(1) % (2 * kk) == 0, "tokenmix.", kOp,
                    ": offset must have 2 * offset_groups * kh * kw channels (a multiple of ",
                    2 * kk, "), got ", offset.size(1));
  const int64_t G = offset.size(1) / (2 * kk);
  TORCH_CHECK_VALUE(Cin % G == 0, "tokenmix.", kOp, ": input channels ", Cin,
                    " must be divisible by the ", G, " offset groups");
  check_size(kOp, "offset", offset, 0, B, "input.size(0)");
  check_size(kOp, "offset", offset, 2, Ho, "H_out");
  check_size(kOp, "offset", offset, 3, Wo, "W_out");

  Problem p;
  p.input = input.contiguous();
  p.offset = offset.contiguous();
  p.weight = weight.contiguous();
  if (bias.has_value() && bias->defined()) {
    check_rank(kOp, "bias", *bias, 1, "[C_out]");
    check_same_dtype(kOp, "bias", *bias, "input", input);
    check_same_device(kOp, "bias", *bias, "input", input);
    check_size(kOp, "bias", *bias, 0, Cout, "weight.size(0)");
    p.bias = bias->contiguous();
  }
  if (mask.has_value() && mask->defined()) {
    check_rank(kOp, "mask", *mask, 4, "[B, offset_groups * kh * kw, H_out, W_out]");
    check_same_dtype(kOp, "mask", *mask, "input", input);
    check_same_device(kOp, "mask", *mask, "input", input);
    check_size(kOp, "mask", *mask, 0, B, "input.size(0)");
    check_size(kOp, "mask", *mask, 1, G * kk, "offset_groups * kh * kw");
    check_size(kOp, "mask", *mask, 2, Ho, "H_out");
    check_size(kOp, "mask", *mask, 3, Wo, "W_out");
    p.mask = mask->contiguous();
  }
  p.geo = Geometry{H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw};
  p.groups = groups;
  p.offset_groups = G;
  return p;
}

// ---- backends ---------------------------------------------------------------------------------

struct CpuBackend {
  static void forward(const Problem& p, at::Tensor& out) {
    deform_conv2d_cpu_kernels().forward(p, out);
  }
  static void backward(const Problem& p, const at::Tensor& grad, at::Tensor& gi, at::Tensor& go,
                       at::Tensor& gw, at::Tensor& gb, at::Tensor& gm) {
    deform_conv2d_cpu_kernels().backward(p, grad, gi, go, gw, gb, gm);
  }
};

#if defined(TOKENMIX_WITH_CUDA)
// fp16/bf16 forwards with one weight group: one fused kernel (sampling into tensor-core tiles).
// Otherwise, and for every backward: sampling kernels around cuBLAS GEMMs, over chunks of images
// whose column buffer stays under kWorkspaceBytes. TOKENMIX_DEFORM_FUSED=0 forces the second
// form, for comparison.
struct CudaBackend {
  static constexpr int64_t kWorkspaceBytes = int64_t{256} << 20;

  static DeformParams params(const Problem& p) {
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
  static int64_t chunk(const Problem& p) {
    const int64_t per_image = p.input.size(1) * p.geo.taps() * p.geo.Ho * p.geo.Wo *
                              p.input.element_size();
    return std::max<int64_t>(1, std::min<int64_t>(p.input.size(0), kWorkspaceBytes / per_image));
  }
  // weight as [1, groups, Cout_g, Cin_g * kk], the layout the column rows (c * kk + tap) match.
  static at::Tensor weight4(const Problem& p) {
    return p.weight.reshape({1, p.groups, p.weight.size(0) / p.groups, -1});
  }
  static at::Tensor im2col(const Problem& p, DeformParams& d, int64_t b0, int64_t nb) {
    const int64_t Kg = p.weight.size(1) * p.geo.taps();
    at::Tensor cols = at::empty({nb, p.groups, Kg, p.geo.Ho * p.geo.Wo}, p.input.options());
    d.b0 = b0;
    d.nb = nb;
    d.cols = cols.mutable_data_ptr();
    check_launch(deform_im2col_cuda(d, current_stream()), "deform_im2col");
    return cols;
  }
  static bool fused_forward(const Problem& p, DeformParams& d, at::Tensor& out) {
    static const bool enabled = env_enabled("TOKENMIX_DEFORM_FUSED");
    if (!enabled || !deform_forward_fused_supported(d, p.groups)) return false;
    // [Cout, Cin, kh, kw] -> [Cout, kh, kw, Cin]: the tap-major columns of ImplicitGemm.
    const at::Tensor wt = p.weight.permute({0, 2, 3, 1}).reshape({p.weight.size(0), -1}).contiguous();
    d.b0 = 0;
    d.nb = p.input.size(0);
    d.weight_tk = wt.const_data_ptr();
    d.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
    d.out = out.mutable_data_ptr();
    d.Cout = p.weight.size(0);
    check_launch(deform_forward_fused_cuda(d, current_stream()), "deform_forward_fused");
    return true;
  }
  static void forward(const Problem& p, at::Tensor& out) {
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
  static void backward(const Problem& p, const at::Tensor& grad, at::Tensor& gi, at::Tensor& go,
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
};
#endif

// ---- ops --------------------------------------------------------------------------------------

template <class Backend>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation,
                        const std::optional<at::Tensor>& mask) {
  const c10::DeviceGuard guard(input.device());
  const Problem p = make_problem(input, offset, weight, bias, stride, padding, dilation, mask);
  at::Tensor out = at::empty({input.size(0), weight.size(0), p.geo.Ho, p.geo.Wo}, input.options());
  if (out.numel() > 0) {
    if (p.input.numel() > 0) {
      Backend::forward(p, out);
    } else {
      out.copy_(p.bias.defined() ? p.bias.view({1, -1, 1, 1}).expand_as(out) : at::zeros_like(out));
    }
  }
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool has_bias) {
  const c10::DeviceGuard guard(input.device());
  const Problem p = make_problem(input, offset, weight, std::nullopt, stride, padding, dilation, mask);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == input.size(0) && grad.size(1) == weight.size(0) &&
                        grad.size(2) == p.geo.Ho && grad.size(3) == p.geo.Wo,
                    "tokenmix.deform_conv2d_backward: grad must have shape [", input.size(0), ", ",
                    weight.size(0), ", ", p.geo.Ho, ", ", p.geo.Wo, "], got ", shape_str(grad));
  at::Tensor gi = at::empty(input.sizes(), input.options());
  at::Tensor go = at::empty(offset.sizes(), offset.options());
  at::Tensor gw = at::empty(weight.sizes(), weight.options());
  at::Tensor gb = has_bias ? at::empty({weight.size(0)}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor gm = p.mask.defined() ? at::empty(p.mask.sizes(), p.mask.options()) : at::empty({0}, input.options());
  if (input.numel() == 0 || grad.numel() == 0) {
    gi.zero_();
    go.zero_();
    gw.zero_();
    gb.zero_();
    gm.zero_();
    if (has_bias && grad.numel() > 0) gb.copy_(grad.sum({0, 2, 3}));
    return {gi, go, gw, gb, gm};
  }
  at::Tensor gb_arg = has_bias ? gb : at::Tensor();
  at::Tensor gm_arg = p.mask.defined() ? gm : at::Tensor();
  Backend::backward(p, grad.contiguous(), gi, go, gw, gb_arg, gm_arg);
  return {gi, go, gw, gb, gm};
}

// ---- autograd ---------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DeformConv2dFn : public torch::autograd::Function<DeformConv2dFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& offset,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(forward_impl<CpuBackend>)>("tokenmix::deform_conv2d");
    const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
    ctx->save_for_backward({input, offset, weight, m});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return op.call(input, offset, weight, bias, stride, padding, dilation, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        op_handle<decltype(backward_impl<CpuBackend>)>("tokenmix::deform_conv2d_backward");
    const auto s = ctx->get_saved_variables();
    const std::optional<at::Tensor> mask = s[3].defined() ? std::optional<at::Tensor>(s[3]) : std::nullopt;
    const bool has_bias = ctx->saved_data["bias"].toBool();
    auto [gi, go, gw, gb, gm] =
        op.call(grads[0], s[0], s[1], s[2], mask, ctx->saved_data["stride"].toIntVector(),
                ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
                has_bias);
    return {gi, go, gw, has_bias ? gb : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            mask.has_value() ? gm : at::Tensor()};
  }
};

at::Tensor deform_conv2d_autograd(const at::Tensor& input, const at::Tensor& offset,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
  return DeformConv2dFn::apply(input, offset, weight, bias, stride, padding, dilation, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("deform_conv2d", &forward_impl<CpuBackend>);
  m.impl("deform_conv2d_backward", &backward_impl<CpuBackend>);
}

#if defined(TOKENMIX_WITH_CUDA)
TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("deform_conv2d", &forward_impl<CudaBackend>);
  m.impl("deform_conv2d_backward", &backward_impl<CudaBackend>);
}
#endif

TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {
  m.impl("deform_conv2d", &deform_conv2d_autograd);
}

TM_AUTOCAST("deform_conv2d", kLowerPrecision)

}  // namespace deform
}  // namespace tokenmix
