// HorNet's recursive gated convolution (gnConv): the schemas, argument checks, the ops over the
// device's kernel table (gnconv_problem.h), C++ autograd and the dispatcher registrations.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <string>

#include "gnconv_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/registration.h"

namespace tokenmix {
namespace gnconv {
namespace {

constexpr const char* kOp = "gnconv";

// A weight of Conv2d shape [out, in, k, k] (1x1 unless k says otherwise) and its bias [out].
void check_conv(const at::Tensor& x, const std::string& name, const at::Tensor& w,
                const std::string& bias_name, const at::Tensor& b, int64_t out, int64_t in, int64_t k) {
  const std::string expect = "[" + std::to_string(out) + ", " + std::to_string(in) + ", " +
                             std::to_string(k) + ", " + std::to_string(k) + "]";
  for (const auto& [n, t] : {std::pair<const std::string*, const at::Tensor*>{&name, &w}, {&bias_name, &b}}) {
    check_same_dtype(kOp, n->c_str(), *t, "x", x);
    check_same_device(kOp, n->c_str(), *t, "x", x);
  }
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) == out && w.size(1) == in && w.size(2) == k && w.size(3) == k,
                    "tokenmix.", kOp, ": ", name, " must have shape ", expect, ", got ", shape_str(w));
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out, "tokenmix.", kOp, ": ", bias_name,
                    " must have shape [", out, "], got ", shape_str(b));
}

Problem make_problem(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                     const at::Tensor& w_dw, const at::Tensor& b_dw, at::TensorList w_pw,
                     at::TensorList b_pw, const at::Tensor& w_out, const at::Tensor& b_out,
                     int64_t order, double scale) {
  check_rank(kOp, "x", x, 4, "[B, dim, H, W]");
  check_floating(kOp, "x", x);
  TORCH_CHECK_VALUE(order >= 1 && order <= kMaxOrder, "tokenmix.", kOp, ": order must be in [1, ",
                    kMaxOrder, "], got ", order);
  const int64_t dim = x.size(1), div = int64_t{1} << (order - 1);
  TORCH_CHECK_VALUE(dim > 0 && dim % div == 0, "tokenmix.", kOp, ": dim (x.size(1) = ", dim,
                    ") must be a positive multiple of 2**(order-1) = ", div, " for order ", order);
  const Layout L = Layout::make(dim, order);
  TORCH_CHECK_VALUE(w_dw.dim() == 4 && w_dw.size(2) == w_dw.size(3) && w_dw.size(2) % 2 == 1 &&
                        w_dw.size(2) <= kMaxKernel,
                    "tokenmix.", kOp, ": dw_weight must have shape [", L.S,
                    ", 1, k, k] with an odd k <= ", kMaxKernel, ", got ", shape_str(w_dw));
  const int64_t k = w_dw.size(2);
  check_conv(x, "proj_in_weight", w_in, "proj_in_bias", b_in, 2 * dim, dim, 1);
  check_conv(x, "dw_weight", w_dw, "dw_bias", b_dw, L.S, 1, k);
  check_conv(x, "proj_out_weight", w_out, "proj_out_bias", b_out, dim, dim, 1);
  TORCH_CHECK_VALUE(static_cast<int64_t>(w_pw.size()) == order - 1 &&
                        static_cast<int64_t>(b_pw.size()) == order - 1,
                    "tokenmix.", kOp, ": pw_weights and pw_biases must hold order - 1 = ", order - 1,
                    " tensors each, got ", w_pw.size(), " and ", b_pw.size());
  for (int64_t i = 0; i + 1 < order; ++i) {
    check_conv(x, "pw_weights[" + std::to_string(i) + "]", w_pw[i],
               "pw_biases[" + std::to_string(i) + "]", b_pw[i], L.dims[i + 1], L.dims[i], 1);
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "tokenmix.", kOp, ": scale must be finite, got ", scale);

  Problem p;
  p.x = x.contiguous(x.suggest_memory_format());
  p.w_in = w_in.contiguous();
  p.b_in = b_in.contiguous();
  p.w_dw = w_dw.contiguous();
  p.b_dw = b_dw.contiguous();
  p.w_out = w_out.contiguous();
  p.b_out = b_out.contiguous();
  for (int64_t i = 0; i + 1 < order; ++i) {
    p.w_pw.push_back(w_pw[i].contiguous());
    p.b_pw.push_back(b_pw[i].contiguous());
  }
  p.lay = L;
  p.geo = DwGeometry{x.size(2), x.size(3), k};
  p.scale = scale;
  return p;
}

Grads empty_grads(const Problem& p) {
  Grads g;
  g.x = at::empty_like(p.x);
  g.w_in = at::empty_like(p.w_in);
  g.b_in = at::empty_like(p.b_in);
  g.w_dw = at::empty_like(p.w_dw);
  g.b_dw = at::empty_like(p.b_dw);
  g.w_out = at::empty_like(p.w_out);
  g.b_out = at::empty_like(p.b_out);
  for (size_t i = 0; i < p.w_pw.size(); ++i) {
    g.w_pw.push_back(at::empty_like(p.w_pw[i]));
    g.b_pw.push_back(at::empty_like(p.b_pw[i]));
  }
  return g;
}

// ---- ops --------------------------------------------------------------------------------------

template <c10::DeviceType D>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                        const at::Tensor& w_dw, const at::Tensor& b_dw, at::TensorList w_pw,
                        at::TensorList b_pw, const at::Tensor& w_out, const at::Tensor& b_out,
                        int64_t order, double scale) {
  const c10::DeviceGuard guard(x.device());
  const Problem p = make_problem(x, w_in, b_in, w_dw, b_dw, w_pw, b_pw, w_out, b_out, order, scale);
  at::Tensor out = at::empty_like(p.x);
  if (out.numel() > 0) kernels<D>().forward(p, out);
  return out;
}

using GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

template <c10::DeviceType D>
GradTuple backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_in,
                        const at::Tensor& b_in, const at::Tensor& w_dw, const at::Tensor& b_dw,
                        at::TensorList w_pw, at::TensorList b_pw, const at::Tensor& w_out,
                        const at::Tensor& b_out, int64_t order, double scale) {
  const c10::DeviceGuard guard(x.device());
  const Problem p = make_problem(x, w_in, b_in, w_dw, b_dw, w_pw, b_pw, w_out, b_out, order, scale);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "tokenmix.gnconv_backward: grad must have shape ",
                    shape_str(x), ", got ", shape_str(grad));
  check_same_dtype("gnconv_backward", "grad", grad, "x", x);
  check_same_device("gnconv_backward", "grad", grad, "x", x);
  Grads g = empty_grads(p);
  if (x.numel() == 0) {
    for (at::Tensor* t : {&g.x, &g.w_in, &g.b_in, &g.w_dw, &g.b_dw, &g.w_out, &g.b_out}) t->zero_();
    for (auto& t : g.w_pw) t.zero_();
    for (auto& t : g.b_pw) t.zero_();
  } else {
    kernels<D>().backward(p, grad.contiguous(p.x.suggest_memory_format()), g);
  }
  return {g.x, g.w_in, g.b_in, g.w_dw, g.b_dw, g.w_pw, g.b_pw, g.w_out, g.b_out};
}

// ---- autograd ---------------------------------------------------------------------------------

class GnConvFn : public torch::autograd::Function<GnConvFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_in,
                            const at::Tensor& b_in, const at::Tensor& w_dw, const at::Tensor& b_dw,
                            at::TensorList w_pw, at::TensorList b_pw, const at::Tensor& w_out,
                            const at::Tensor& b_out, int64_t order, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    variable_list saved{x, w_in, b_in, w_dw, b_dw, w_out, b_out};
    saved.insert(saved.end(), w_pw.begin(), w_pw.end());
    saved.insert(saved.end(), b_pw.begin(), b_pw.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["order"] = order;
    ctx->saved_data["scale"] = scale;
    return op_of<forward_impl<c10::kCPU>>("tokenmix::gnconv")
        .call(x, w_in, b_in, w_dw, b_dw, w_pw, b_pw, w_out, b_out, order, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t order = ctx->saved_data["order"].toInt();
    const std::vector<at::Tensor> w_pw(s.begin() + 7, s.begin() + 7 + (order - 1));
    const std::vector<at::Tensor> b_pw(s.begin() + 7 + (order - 1), s.end());
    auto [gx, gwi, gbi, gwd, gbd, gwp, gbp, gwo, gbo] =
        op_of<backward_impl<c10::kCPU>>("tokenmix::gnconv_backward")
            .call(grads[0], s[0], s[1], s[2], s[3], s[4], w_pw, b_pw, s[5], s[6], order,
                  ctx->saved_data["scale"].toDouble());
    variable_list out{gx, gwi, gbi, gwd, gbd};
    out.insert(out.end(), gwp.begin(), gwp.end());
    out.insert(out.end(), gbp.begin(), gbp.end());
    out.insert(out.end(), {gwo, gbo, at::Tensor(), at::Tensor()});
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  def(m,
      "gnconv(Tensor x, Tensor proj_in_weight, Tensor proj_in_bias, Tensor dw_weight, "
      "Tensor dw_bias, Tensor[] pw_weights, Tensor[] pw_biases, Tensor proj_out_weight, "
      "Tensor proj_out_bias, *, int order, float scale) -> Tensor");
  def(m,
      "gnconv_backward(Tensor grad, Tensor x, Tensor proj_in_weight, Tensor proj_in_bias, "
      "Tensor dw_weight, Tensor dw_bias, Tensor[] pw_weights, Tensor[] pw_biases, "
      "Tensor proj_out_weight, Tensor proj_out_bias, *, int order, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");
}

TM_IMPL("gnconv", forward_impl)
TM_IMPL("gnconv_backward", backward_impl)

TM_AUTOGRAD("gnconv", GnConvFn)

TM_AUTOCAST("gnconv", kLowerPrecision)

}  // namespace gnconv
}  // namespace tokenmix
