// Windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net local windows): argument
// checks, the ops over the device's kernel table (window_attention_problem.h), C++ autograd and
// the dispatcher registrations. Schemas are defined here too.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>

#include "tokenmix/checks.h"
#include "tokenmix/registration.h"
#include "window_attention_problem.h"

namespace tokenmix {
namespace window_attention {
namespace {

// Checks every argument and builds the problem; q, k, v keep their strides when the last one is 1.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     at::IntArrayRef window_size, at::IntArrayRef shift_size,
                     const std::optional<at::Tensor>& bias_table, std::optional<double> scale) {
  check_rank(kOp, "k", k, 5, "[B, H, W, heads, head_dim]");
  check_floating(kOp, "k", k);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "tokenmix.", kOp, ": v must have the shape of k ",
                    shape_str(k), ", got ", shape_str(v));
  check_same_dtype(kOp, "v", v, "k", k);
  check_same_device(kOp, "v", v, "k", k);
  check_rank(kOp, "q", q, 5, "[B, H, W, heads, head_dim] or [B, wh, ww, heads, head_dim]");
  check_same_dtype(kOp, "q", q, "k", k);
  check_same_device(kOp, "q", q, "k", k);

  const auto [wh, ww] = int_pair(kOp, "window_size", window_size);
  const auto [sh, sw] = int_pair(kOp, "shift_size", shift_size);
  const int64_t B = k.size(0), H = k.size(1), W = k.size(2), heads = k.size(3), d = k.size(4);
  TORCH_CHECK_VALUE(wh > 0 && ww > 0, "tokenmix.", kOp, ": window_size must be positive, got (",
                    wh, ", ", ww, ")");
  TORCH_CHECK_VALUE(wh <= H && ww <= W, "tokenmix.", kOp, ": window_size (", wh, ", ", ww,
                    ") must not exceed the map (H, W) = (", H, ", ", W, ")");
  TORCH_CHECK_VALUE(sh >= 0 && sh < wh && sw >= 0 && sw < ww, "tokenmix.", kOp,
                    ": shift_size must lie in [0, window_size) per dim, got (", sh, ", ", sw,
                    ") for window (", wh, ", ", ww, ")");
  TORCH_CHECK_VALUE((sh == 0 && sw == 0) || (H % wh == 0 && W % ww == 0), "tokenmix.", kOp,
                    ": a shifted window needs H % wh == 0 and W % ww == 0, got map (", H, ", ", W,
                    ") and window (", wh, ", ", ww, ")");

  const bool global_q = q.sizes() != k.sizes();
  if (global_q) {
    TORCH_CHECK_VALUE(q.size(0) == B && q.size(1) == wh && q.size(2) == ww, "tokenmix.", kOp,
                      ": q must have the shape of k ", shape_str(k),
                      " or be one window of global queries [B, wh, ww, heads, head_dim] = [", B,
                      ", ", wh, ", ", ww, ", ", heads, ", ", d, "], got ", shape_str(q));
    TORCH_CHECK_VALUE(q.size(3) == heads, "tokenmix.", kOp, ": q has ", q.size(3),
                      " heads, k has ", heads);
    TORCH_CHECK_VALUE(q.size(4) == d, "tokenmix.", kOp, ": q has head_dim ", q.size(4),
                      ", k has ", d);
  }

  Problem p;
  p.q = with_unit_channel_stride(q);
  p.k = with_unit_channel_stride(k);
  p.v = with_unit_channel_stride(v);
  p.geo = make_geometry(H, W, wh, ww, sh, sw);
  p.global_q = global_q;
  p.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  if (bias_table.has_value() && bias_table->defined()) {
    const at::Tensor& t = *bias_table;
    check_rank(kOp, "bias_table", t, 2, "[(2 wh - 1) * (2 ww - 1), heads]");
    check_floating(kOp, "bias_table", t);
    check_same_device(kOp, "bias_table", t, "k", k);
    TORCH_CHECK_VALUE(t.size(0) == p.geo.table_size() && t.size(1) == heads, "tokenmix.", kOp,
                      ": bias_table must have shape [(2 wh - 1) * (2 ww - 1), heads] = [",
                      p.geo.table_size(), ", ", heads, "], got ", shape_str(t));
    // The kernels read the table in the activations' dtype; an fp32 table (a parameter beside
    // fp16/bf16 activations) is converted here, (2wh-1)(2ww-1) x heads values.
    p.bias_table = t.to(k.scalar_type()).contiguous();
  }
  return p;
}

// ---- ops --------------------------------------------------------------------------------------

// The forward's outputs, unfilled: out [B, H, W, heads, d], and when `with_lse` (only backward
// needs it) the row log-sum-exp [B, windows, tokens, heads] in the accumulation type. The one
// definition of their shapes: the Meta kernel below (what torch.compile traces with) uses it too.
std::tuple<at::Tensor, at::Tensor> forward_outputs(const Problem& p, const at::Tensor& k,
                                                   bool with_lse) {
  at::Tensor out = at::empty(k.sizes(), k.options());
  at::Tensor lse;
  if (with_lse) {
    lse = at::empty({k.size(0), p.geo.windows(), p.geo.tokens(), k.size(3)},
                    k.options().dtype(acc_scalar_type(k.scalar_type())));
  }
  return {out, lse};
}

// The output, and the row log-sum-exp when `with_lse`.
template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, at::IntArrayRef window_size,
                                               at::IntArrayRef shift_size,
                                               const std::optional<at::Tensor>& bias_table,
                                               std::optional<double> scale, bool with_lse) {
  const c10::DeviceGuard guard(k.device());
  const Problem p = make_problem(q, k, v, window_size, shift_size, bias_table, scale);
  auto [out, lse] = forward_outputs(p, k, with_lse);
  if (out.numel() > 0) {
    kernels<D>().forward(p, out, lse);
  }
  return {out, lse};
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, at::IntArrayRef window_size,
                                                at::IntArrayRef shift_size,
                                                const std::optional<at::Tensor>& bias_table,
                                                std::optional<double> scale) {
  return run_forward<D>(q, k, v, window_size, shift_size, bias_table, scale, true);
}

// Meta (fake-tensor) kernel of window_attention_fwd: the same checks and output shapes, no work.
std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, at::IntArrayRef window_size,
                                                at::IntArrayRef shift_size,
                                                const std::optional<at::Tensor>& bias_table,
                                                std::optional<double> scale) {
  return forward_outputs(make_problem(q, k, v, window_size, shift_size, bias_table, scale), k, true);
}

template <c10::DeviceType D>
at::Tensor window_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                 const std::optional<at::Tensor>& bias_table,
                                 std::optional<double> scale) {
  return std::get<0>(
      run_forward<D>(q, k, v, window_size, shift_size, bias_table, scale, false));
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const std::optional<at::Tensor>& bias_table, std::optional<double> scale) {
  const c10::DeviceGuard guard(k.device());
  const Problem p = make_problem(q, k, v, window_size, shift_size, bias_table, scale);
  TORCH_CHECK_VALUE(grad.sizes() == k.sizes(), "tokenmix.window_attention_backward: grad must have ",
                    "the shape of k ", shape_str(k), ", got ", shape_str(grad));
  const at::Tensor g = grad.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dbias = p.bias_table.defined() ? at::empty(p.bias_table.sizes(), k.options())
                                            : at::empty({0}, k.options());
  if (k.numel() > 0) {
    kernels<D>().backward(p, g, lse.contiguous(), dq, dk, dv, dbias);
  } else {
    dq.zero_();
    dbias.zero_();
  }
  if (bias_table.has_value() && bias_table->defined()) {
    dbias = dbias.to(bias_table->scalar_type());
  }
  return {dq, dk, dv, dbias};
}

// ---- autograd ---------------------------------------------------------------------------------

class WindowAttentionFn : public torch::autograd::Function<WindowAttentionFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, at::IntArrayRef window_size,
                            at::IntArrayRef shift_size, const std::optional<at::Tensor>& bias_table,
                            std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op_of<forward_impl<c10::kCPU>>("tokenmix::window_attention_fwd")
                          .call(q, k, v, window_size, shift_size, bias_table, scale);
    ctx->save_for_backward({q, k, v, lse, saved_optional(bias_table)});
    ctx->saved_data["window_size"] = window_size.vec();
    ctx->saved_data["shift_size"] = shift_size.vec();
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> table = restored_optional(saved[4]);
    auto [dq, dk, dv, dbias] =
        op_of<backward_impl<c10::kCPU>>("tokenmix::window_attention_backward")
            .call(grads[0], saved[0], saved[1], saved[2], saved[3],
                  ctx->saved_data["window_size"].toIntVector(),
                  ctx->saved_data["shift_size"].toIntVector(), table,
                  ctx->saved_data["scale"].toOptional<double>());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), grad_if(table.has_value(), dbias),
            at::Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  // The public op returns the output; _fwd also returns the row log-sum-exp that backward
  // recomputes P from.
  def(m,
      "window_attention(Tensor q, Tensor k, Tensor v, int[2] window_size, int[2] shift_size=[0, 0], "
      "Tensor? bias_table=None, float? scale=None) -> Tensor");
  def(m,
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, int[2] window_size, int[2] shift_size, "
      "Tensor? bias_table, float? scale) -> (Tensor, Tensor)");
  def(m,
      "window_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "int[2] window_size, int[2] shift_size, Tensor? bias_table, float? scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TM_IMPL("window_attention", window_attention_impl)
TM_IMPL("window_attention_fwd", forward_impl)
TM_IMPL("window_attention_backward", backward_impl)
TORCH_LIBRARY_IMPL(tokenmix, Meta, m) {
  m.impl("window_attention_fwd", &forward_meta);
}

TM_AUTOGRAD("window_attention", WindowAttentionFn)

TM_AUTOCAST("window_attention", kLowerPrecision)

}  // namespace window_attention
}  // namespace tokenmix
