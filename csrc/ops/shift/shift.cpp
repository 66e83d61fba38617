// Shifted / rearranged token-mixing family (AS-MLP, CycleMLP, Hire-MLP, RaftMLP): schemas,
// argument checks, each op composed from the four primitives of the device's kernel table
// (shift_problem.h), C++ autograd and the dispatcher registrations.
//
// Every backward is again a primitive call through a map: the shift's adjoint is the shift with
// negated offsets (or, after a projection, the projection stored through the forward's map); the
// fold's adjoint is the unfold that adds the padded copies; the unfold's adjoint is the fold with
// zeros where the crop dropped positions. Only the fold-then-project backward materialises one
// tensor, the folded-shape gradient W^T dY, because its padded copies add into shared positions.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <string>
#include <vector>

#include "shift_args.h"
#include "shift_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/registration.h"

namespace tokenmix {
namespace shift {
namespace {

// ---- ops ----------------------------------------------------------------------------------------

template <c10::DeviceType D>
at::Tensor shift_tokens_impl(const at::Tensor& x, at::IntArrayRef shifts, at::IntArrayRef groups,
                             c10::string_view mode) {
  const c10::DeviceGuard guard(x.device());
  const char* op = "shift_tokens";
  check_map(op, "x", x);
  const ShiftSpec s = shift_spec(op, x, shifts, groups, mode);
  at::Tensor out = empty_like_format(x, x.sizes());
  if (out.numel() > 0) {
    kernels<D>().gather(x, s.map, out);
  }
  return out;
}

template <c10::DeviceType D>
at::Tensor shift_linear_impl(const at::Tensor& x, at::IntArrayRef shifts, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef groups,
                             c10::string_view mode) {
  const c10::DeviceGuard guard(x.device());
  const char* op = "shift_linear";
  check_map(op, "x", x);
  const ShiftSpec s = shift_spec(op, x, shifts, groups, mode);
  const at::Tensor w = weight_matrix(op, weight, x, x.size(1), "x.size(1)");
  const at::Tensor b = bias_vector(op, bias, x, w.size(0));
  at::Tensor out = empty_like_format(x, {x.size(0), w.size(0), x.size(2), x.size(3)});
  if (out.numel() > 0) {
    kernels<D>().linear(x, s.map, w, b, identity_map(out), out);
  }
  return out;
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_linear_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef shifts, const at::Tensor& weight,
    at::IntArrayRef groups, c10::string_view mode) {
  const c10::DeviceGuard guard(x.device());
  const char* op = "shift_linear_backward";
  check_map(op, "x", x);
  const ShiftSpec s = shift_spec(op, x, shifts, groups, mode);
  const at::Tensor w = weight_matrix(op, weight, x, x.size(1), "x.size(1)");
  const int64_t J = w.size(0), K = w.size(1);
  check_grad(op, grad, x, "x", {x.size(0), J, x.size(2), x.size(3)});
  // The transposed projection stored through the forward's shift: grad_x[b, c, h - dy, w - dx] =
  // sum_j W[j, c] grad[b, j, h, w]. In zeros mode some positions receive nothing.
  at::Tensor grad_x = empty_like_format(x, x.sizes());
  if (!s.map.circular || grad.numel() == 0) {
    grad_x.zero_();
  }
  auto [gw, gb] = param_grad_buffers(weight, J, K);
  if (grad.numel() > 0) {
    kernels<D>().linear(grad, identity_map(grad), w.t(), at::Tensor(), s.map, grad_x);
  }
  kernels<D>().weight_grad(grad, identity_map(grad), x, s.map, gw, gb);
  auto [grad_w, grad_b] = param_grads(gw, gb, weight);
  return {grad_x, grad_w, grad_b};
}

template <c10::DeviceType D>
at::Tensor region_fold_impl(const at::Tensor& x, int64_t axis, int64_t region, int64_t shift) {
  const c10::DeviceGuard guard(x.device());
  const char* op = "region_fold";
  check_map(op, "x", x);
  const TokenMap m = fold_map(op, x.size(1), x.size(2), x.size(3), axis, region, shift, true);
  at::Tensor out = empty_like_format(x, grid_shape(x, m));
  if (out.numel() > 0) {
    kernels<D>().gather(x, m, out);
  }
  return out;
}

// The unfold of `grid` to an axis of length `size`: region_unfold (no wrap) and the fold's adjoint
// region_fold_backward (wrap: the padded copies' gradients add into their sources).
template <c10::DeviceType D>
at::Tensor unfold_op(const char* op, const char* name, const at::Tensor& grid, int64_t axis,
                     int64_t region, int64_t size, int64_t shift, bool wrap) {
  const c10::DeviceGuard guard(grid.device());
  check_map(op, name, grid);
  const std::string channels = std::string(name) + ".size(1)";
  const TokenMap m = fold_map_of_grid(op, channels.c_str(), grid.size(1), grid.size(2),
                                      grid.size(3), axis, region, size, shift, wrap);
  at::Tensor out = empty_like_format(grid, {grid.size(0), m.C, m.H, m.W});
  if (out.numel() > 0) {
    kernels<D>().unfold(grid, m, out);
  }
  return out;
}

template <c10::DeviceType D>
at::Tensor region_fold_backward_impl(const at::Tensor& grad, int64_t axis, int64_t region,
                                     int64_t size, int64_t shift) {
  return unfold_op<D>("region_fold_backward", "grad", grad, axis, region, size, shift, true);
}

template <c10::DeviceType D>
at::Tensor region_unfold_impl(const at::Tensor& y, int64_t axis, int64_t region, int64_t size,
                              int64_t shift) {
  return unfold_op<D>("region_unfold", "y", y, axis, region, size, shift, false);
}

template <c10::DeviceType D>
at::Tensor region_unfold_backward_impl(const at::Tensor& grad, int64_t axis, int64_t region,
                                       int64_t shift) {
  const c10::DeviceGuard guard(grad.device());
  const char* op = "region_unfold_backward";
  check_map(op, "grad", grad);
  const TokenMap m =
      fold_map(op, grad.size(1), grad.size(2), grad.size(3), axis, region, shift, false);
  at::Tensor out = empty_like_format(grad, grid_shape(grad, m));
  if (out.numel() > 0) {
    kernels<D>().gather(grad, m, out);
  }
  return out;
}

template <c10::DeviceType D>
at::Tensor region_fold_linear_impl(const at::Tensor& x, int64_t axis, int64_t region,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   int64_t shift) {
  const c10::DeviceGuard guard(x.device());
  const char* op = "region_fold_linear";
  check_map(op, "x", x);
  const TokenMap m = fold_map(op, x.size(1), x.size(2), x.size(3), axis, region, shift, true);
  const at::Tensor w = weight_matrix(op, weight, x, m.K(), "x.size(1) * region");
  const at::Tensor b = bias_vector(op, bias, x, w.size(0));
  at::Tensor out = empty_like_format(x, {x.size(0), w.size(0), m.GH(), m.GW()});
  if (out.numel() > 0) {
    kernels<D>().linear(x, m, w, b, identity_map(out), out);
  }
  return out;
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor, at::Tensor> region_fold_linear_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, int64_t axis, int64_t region,
    const at::Tensor& weight, int64_t shift) {
  const c10::DeviceGuard guard(x.device());
  const char* op = "region_fold_linear_backward";
  check_map(op, "x", x);
  const TokenMap m = fold_map(op, x.size(1), x.size(2), x.size(3), axis, region, shift, true);
  const at::Tensor w = weight_matrix(op, weight, x, m.K(), "x.size(1) * region");
  const int64_t J = w.size(0);
  check_grad(op, grad, x, "x", {x.size(0), J, m.GH(), m.GW()});
  at::Tensor grad_x = empty_like_format(x, x.sizes());
  auto [gw, gb] = param_grad_buffers(weight, J, m.K());
  if (grad.numel() > 0) {
    // W^T dY on the folded grid, then the fold's adjoint (the padded copies add up).
    at::Tensor folded = at::empty(grid_shape(x, m), x.options());
    kernels<D>().linear(grad, identity_map(grad), w.t(), at::Tensor(),
                        identity_map(folded), folded);
    kernels<D>().unfold(folded, m, grad_x);
  } else if (grad_x.numel() > 0) {
    grad_x.zero_();
  }
  kernels<D>().weight_grad(grad, identity_map(grad), x, m, gw, gb);
  auto [grad_w, grad_b] = param_grads(gw, gb, weight);
  return {grad_x, grad_w, grad_b};
}

template <c10::DeviceType D>
at::Tensor linear_region_unfold_impl(const at::Tensor& y, int64_t axis, int64_t region,
                                     int64_t size, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t shift) {
  const c10::DeviceGuard guard(y.device());
  const char* op = "linear_region_unfold";
  check_map(op, "y", y);
  const at::Tensor w = weight_matrix(op, weight, y, y.size(1), "y.size(1)", "y");
  const at::Tensor b = bias_vector(op, bias, y, w.size(0), "y");
  const TokenMap m = fold_map_of_grid(op, "weight.size(0)", w.size(0), y.size(2), y.size(3), axis,
                                      region, size, shift, false);
  at::Tensor out = empty_like_format(y, {y.size(0), m.C, m.H, m.W});
  if (out.numel() > 0) {
    kernels<D>().linear(y, identity_map(y), w, b, m, out);
  }
  return out;
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_region_unfold_backward_impl(
    const at::Tensor& grad, const at::Tensor& y, int64_t axis, int64_t region,
    const at::Tensor& weight, int64_t shift) {
  const c10::DeviceGuard guard(y.device());
  const char* op = "linear_region_unfold_backward";
  check_map(op, "y", y);
  const at::Tensor w = weight_matrix(op, weight, y, y.size(1), "y.size(1)", "y");
  const int64_t J = w.size(0);
  check_map(op, "grad", grad);
  TORCH_CHECK_VALUE(region >= 1 && J % region == 0, "tokenmix.", op, ": weight.size(0) = ", J,
                    " must be divisible by region = ", region);
  check_axis(op, axis);
  const TokenMap m =
      fold_map(op, grad.size(1), grad.size(2), grad.size(3), axis, region, shift, false);
  check_grad(op, grad, y, "y", {y.size(0), J / region, m.H, m.W});
  TORCH_CHECK_VALUE(m.GH() == y.size(2) && m.GW() == y.size(3), "tokenmix.", op,
                    ": grad must fold to y's map ", shape_str(y), ", got ", shape_str(grad));
  at::Tensor grad_y = empty_like_format(y, y.sizes());
  auto [gw, gb] = param_grad_buffers(weight, J, y.size(1));
  if (grad.numel() == 0) {
    grad_y.zero_();
  } else if (grad_y.numel() > 0) {
    kernels<D>().linear(grad, m, w.t(), at::Tensor(), identity_map(grad_y), grad_y);
  }
  kernels<D>().weight_grad(grad, m, y, identity_map(y), gw, gb);
  auto [grad_w, grad_b] = param_grads(gw, gb, weight);
  return {grad_y, grad_w, grad_b};
}

// ---- autograd -----------------------------------------------------------------------------------

using IntList = at::IntArrayRef;

class ShiftTokensFn : public torch::autograd::Function<ShiftTokensFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, IntList shifts,
                            IntList groups, c10::string_view mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<int64_t> negated(shifts.begin(), shifts.end());
    for (auto& v : negated) v = -v;
    ctx->saved_data["negated"] = negated;
    ctx->saved_data["groups"] = groups.vec();
    ctx->saved_data["mode"] = std::string(mode);
    return op_of<shift_tokens_impl<c10::kCPU>>("tokenmix::shift_tokens").call(x, shifts, groups, mode);
  }
  // The adjoint of a shift is the shift back (zeros mode: the positions shifted out get none).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    return {op_of<shift_tokens_impl<c10::kCPU>>("tokenmix::shift_tokens")
                .call(grads[0], ctx->saved_data["negated"].toIntVector(),
                      ctx->saved_data["groups"].toIntVector(), mode),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ShiftLinearFn : public torch::autograd::Function<ShiftLinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, IntList shifts,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            IntList groups, c10::string_view mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["shifts"] = shifts.vec();
    ctx->saved_data["groups"] = groups.vec();
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return op_of<shift_linear_impl<c10::kCPU>>("tokenmix::shift_linear")
        .call(x, shifts, weight, bias, groups, mode);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    auto [gx, gw, gb] =
        op_of<shift_linear_backward_impl<c10::kCPU>>("tokenmix::shift_linear_backward")
            .call(grads[0], s[0], ctx->saved_data["shifts"].toIntVector(), s[1],
                  ctx->saved_data["groups"].toIntVector(), mode);
    return {gx, at::Tensor(), gw, grad_if(ctx->saved_data["bias"].toBool(), gb), at::Tensor(),
            at::Tensor()};
  }
};

// Fold and unfold are each other's adjoints up to the padding: the ops below reach the backward
// ops through handles typed with the schema's SymInt, so that dynamic shapes trace through.
using UnfoldSig = at::Tensor(const at::Tensor&, int64_t, int64_t, c10::SymInt, int64_t);

class RegionFoldFn : public torch::autograd::Function<RegionFoldFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t axis,
                            int64_t region, int64_t shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["region"] = region;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["size"] = x.sym_size(axis >= 0 && axis < x.dim() ? axis : 0);
    return op_of<region_fold_impl<c10::kCPU>>("tokenmix::region_fold").call(x, axis, region, shift);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<UnfoldSig>("tokenmix::region_fold_backward");
    auto& d = ctx->saved_data;
    return {op.call(grads[0], d["axis"].toInt(), d["region"].toInt(), d["size"].toSymInt(),
                    d["shift"].toInt()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class RegionUnfoldFn : public torch::autograd::Function<RegionUnfoldFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, int64_t axis,
                            int64_t region, c10::SymInt size, int64_t shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<UnfoldSig>("tokenmix::region_unfold");
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["region"] = region;
    ctx->saved_data["shift"] = shift;
    return op.call(y, axis, region, std::move(size), shift);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    return {op_of<region_unfold_backward_impl<c10::kCPU>>("tokenmix::region_unfold_backward")
                .call(grads[0], d["axis"].toInt(), d["region"].toInt(), d["shift"].toInt()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class RegionFoldLinearFn : public torch::autograd::Function<RegionFoldLinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t axis,
                            int64_t region, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["region"] = region;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return op_of<region_fold_linear_impl<c10::kCPU>>("tokenmix::region_fold_linear")
        .call(x, axis, region, weight, bias, shift);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [gx, gw, gb] = op_of<region_fold_linear_backward_impl<c10::kCPU>>(
                            "tokenmix::region_fold_linear_backward")
                            .call(grads[0], s[0], d["axis"].toInt(), d["region"].toInt(), s[1],
                                  d["shift"].toInt());
    return {gx, at::Tensor(), at::Tensor(), gw, grad_if(d["bias"].toBool(), gb), at::Tensor()};
  }
};

class LinearRegionUnfoldFn : public torch::autograd::Function<LinearRegionUnfoldFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, int64_t axis,
                            int64_t region, c10::SymInt size, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    using Sig = at::Tensor(const at::Tensor&, int64_t, int64_t, c10::SymInt, const at::Tensor&,
                           const std::optional<at::Tensor>&, int64_t);
    static const auto op = op_handle<Sig>("tokenmix::linear_region_unfold");
    ctx->save_for_backward({y, weight});
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["region"] = region;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return op.call(y, axis, region, std::move(size), weight, bias, shift);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    auto [gy, gw, gb] = op_of<linear_region_unfold_backward_impl<c10::kCPU>>(
                            "tokenmix::linear_region_unfold_backward")
                            .call(grads[0], s[0], d["axis"].toInt(), d["region"].toInt(), s[1],
                                  d["shift"].toInt());
    return {gy,           at::Tensor(), at::Tensor(), at::Tensor(),
            gw,           grad_if(d["bias"].toBool(), gb), at::Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  def(m, "shift_tokens(Tensor x, int[] shifts, int[] groups, str mode) -> Tensor");
  def(m,
      "shift_linear(Tensor x, int[] shifts, Tensor weight, Tensor? bias, int[] groups, str mode) "
      "-> Tensor");
  def(m,
      "shift_linear_backward(Tensor grad, Tensor x, int[] shifts, Tensor weight, int[] groups, "
      "str mode) -> (Tensor, Tensor, Tensor)");
  def(m, "region_fold(Tensor x, int axis, int region, int shift) -> Tensor");
  def(m,
      "region_fold_backward(Tensor grad, int axis, int region, SymInt size, int shift) -> Tensor");
  def(m, "region_unfold(Tensor y, int axis, int region, SymInt size, int shift) -> Tensor");
  def(m, "region_unfold_backward(Tensor grad, int axis, int region, int shift) -> Tensor");
  def(m,
      "region_fold_linear(Tensor x, int axis, int region, Tensor weight, Tensor? bias, int shift) "
      "-> Tensor");
  def(m,
      "region_fold_linear_backward(Tensor grad, Tensor x, int axis, int region, Tensor weight, "
      "int shift) -> (Tensor, Tensor, Tensor)");
  def(m,
      "linear_region_unfold(Tensor y, int axis, int region, SymInt size, Tensor weight, "
      "Tensor? bias, int shift) -> Tensor");
  def(m,
      "linear_region_unfold_backward(Tensor grad, Tensor y, int axis, int region, Tensor weight, "
      "int shift) -> (Tensor, Tensor, Tensor)");
}

TM_IMPL("shift_tokens", shift_tokens_impl)
TM_IMPL("shift_linear", shift_linear_impl)
TM_IMPL("shift_linear_backward", shift_linear_backward_impl)
TM_IMPL("region_fold", region_fold_impl)
TM_IMPL("region_fold_backward", region_fold_backward_impl)
TM_IMPL("region_unfold", region_unfold_impl)
TM_IMPL("region_unfold_backward", region_unfold_backward_impl)
TM_IMPL("region_fold_linear", region_fold_linear_impl)
TM_IMPL("region_fold_linear_backward", region_fold_linear_backward_impl)
TM_IMPL("linear_region_unfold", linear_region_unfold_impl)
TM_IMPL("linear_region_unfold_backward", linear_region_unfold_backward_impl)

TM_AUTOGRAD("shift_tokens", ShiftTokensFn)
TM_AUTOGRAD("shift_linear", ShiftLinearFn)
TM_AUTOGRAD("region_fold", RegionFoldFn)
TM_AUTOGRAD("region_unfold", RegionUnfoldFn)
TM_AUTOGRAD("region_fold_linear", RegionFoldLinearFn)
TM_AUTOGRAD("linear_region_unfold", LinearRegionUnfoldFn)

// Shifts and folds move data and keep their dtype; the projections are GEMMs that accumulate in
// fp32 and run in the autocast dtype.
TM_AUTOCAST("shift_tokens", kKeep)
TM_AUTOCAST("region_fold", kKeep)
TM_AUTOCAST("region_unfold", kKeep)
TM_AUTOCAST("shift_linear", kLowerPrecision)
TM_AUTOCAST("region_fold_linear", kLowerPrecision)
TM_AUTOCAST("linear_region_unfold", kLowerPrecision)

}  // namespace shift
}  // namespace tokenmix
