// Deformable convolution (DCNv1/v2 as torchvision.ops.deform_conv2d, used by LIT's token
// merging): argument checks, the ops over the device's kernel table (deform_conv2d_problem.h),
// C++ autograd and the dispatcher registrations. Schemas are defined here too.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "deform_conv2d_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/registration.h"

namespace tokenmix {
namespace deform_conv2d {
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

// ---- ops --------------------------------------------------------------------------------------

template <c10::DeviceType D>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation,
                        const std::optional<at::Tensor>& mask) {
  const c10::DeviceGuard guard(input.device());
  const Problem p = make_problem(input, offset, weight, bias, stride, padding, dilation, mask);
  at::Tensor out = at::empty({input.size(0), weight.size(0), p.geo.Ho, p.geo.Wo}, input.options());
  if (out.numel() > 0) {
    if (p.input.numel() > 0) {
      kernels<D>().forward(p, out);
    } else {
      out.copy_(p.bias.defined() ? p.bias.view({1, -1, 1, 1}).expand_as(out) : at::zeros_like(out));
    }
  }
  return out;
}

template <c10::DeviceType D>
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
  kernels<D>().backward(p, grad.contiguous(), gi, go, gw, gb_arg, gm_arg);
  return {gi, go, gw, gb, gm};
}

// ---- autograd ---------------------------------------------------------------------------------

class DeformConv2dFn : public torch::autograd::Function<DeformConv2dFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& offset,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, offset, weight, saved_optional(mask)});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return op_of<forward_impl<c10::kCPU>>("tokenmix::deform_conv2d")
        .call(input, offset, weight, bias, stride, padding, dilation, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::optional<at::Tensor> mask = restored_optional(s[3]);
    const bool has_bias = ctx->saved_data["bias"].toBool();
    auto [gi, go, gw, gb, gm] =
        op_of<backward_impl<c10::kCPU>>("tokenmix::deform_conv2d_backward")
            .call(grads[0], s[0], s[1], s[2], mask, ctx->saved_data["stride"].toIntVector(),
                  ctx->saved_data["padding"].toIntVector(),
                  ctx->saved_data["dilation"].toIntVector(), has_bias);
    return {gi, go, gw, grad_if(has_bias, gb), at::Tensor(), at::Tensor(), at::Tensor(),
            grad_if(mask.has_value(), gm)};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  // torchvision's signature.
  def(m,
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias=None, "
      "int[2] stride=[1, 1], int[2] padding=[0, 0], int[2] dilation=[1, 1], Tensor? mask=None) "
      "-> Tensor");
  def(m,
      "deform_conv2d_backward(Tensor grad, Tensor input, Tensor offset, Tensor weight, "
      "Tensor? mask, int[2] stride, int[2] padding, int[2] dilation, bool bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TM_IMPL("deform_conv2d", forward_impl)
TM_IMPL("deform_conv2d_backward", backward_impl)

TM_AUTOGRAD("deform_conv2d", DeformConv2dFn)

TM_AUTOCAST("deform_conv2d", kLowerPrecision)

}  // namespace deform_conv2d
}  // namespace tokenmix
