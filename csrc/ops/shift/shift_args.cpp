// Argument checks and maps of the shifted / rearranged token-mixing family (shift_args.h).

#include "shift_args.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "tokenmix/checks.h"

namespace tokenmix {
namespace shift {

void check_map(const char* op, const char* name, const at::Tensor& x) {
  check_rank(op, name, x, 4, "[B, C, H, W]");
  check_floating(op, name, x);
}

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

TokenMap identity_map(const at::Tensor& t) {
  TokenMap m{};
  m.kind = MapKind::Identity;
  m.C = t.size(1);
  m.H = t.size(2);
  m.W = t.size(3);
  return m;
}

namespace {

bool circular_mode(const char* op, c10::string_view mode) {
  TORCH_CHECK_VALUE(mode == "zeros" || mode == "circular", "tokenmix.", op,
                    ": mode must be \"zeros\" or \"circular\", got \"", std::string(mode), "\"");
  return mode == "circular";
}

}  // namespace

ShiftSpec shift_spec(const char* op, const at::Tensor& x, at::IntArrayRef shifts,
                     at::IntArrayRef groups, c10::string_view mode) {
  const bool circular = circular_mode(op, mode);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(!shifts.empty() && shifts.size() % 2 == 0, "tokenmix.", op,
                    ": shifts must hold G >= 1 (dy, dx) pairs, got ", shifts.size(), " numbers");
  const int64_t G = static_cast<int64_t>(shifts.size()) / 2;
  std::vector<int64_t> sizes;
  if (groups.empty()) {
    TORCH_CHECK_VALUE(C % G == 0, "tokenmix.", op, ": x.size(1) = ", C,
                      " must be divisible by the number of shift pairs G = ", G,
                      " when groups is None");
    sizes.assign(G, C / G);
  } else {
    TORCH_CHECK_VALUE(static_cast<int64_t>(groups.size()) == G, "tokenmix.", op,
                      ": groups must give one channel count per shift pair (", G, "), got ",
                      groups.size());
    int64_t total = 0;
    for (const int64_t g : groups) {
      TORCH_CHECK_VALUE(g >= 0, "tokenmix.", op, ": groups must be channel counts >= 0, got ", g);
      total += g;
    }
    TORCH_CHECK_VALUE(total == C, "tokenmix.", op, ": groups must sum to x.size(1) = ", C,
                      ", got ", total);
    sizes.assign(groups.begin(), groups.end());
  }
  at::Tensor table = at::empty({C, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t c = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t dy = H > 0 ? normalise_shift(shifts[2 * g], H, circular) : 0;
    const int64_t dx = W > 0 ? normalise_shift(shifts[2 * g + 1], W, circular) : 0;
    for (int64_t i = 0; i < sizes[g]; ++i, ++c) {
      t[2 * c] = dy;
      t[2 * c + 1] = dx;
    }
  }
  if (!x.is_cpu()) {
    table = table.to(x.device());
  }
  ShiftSpec s{identity_map(x), table};
  s.map.kind = MapKind::Shift;
  s.map.dyx = s.table.const_data_ptr<int64_t>();
  s.map.circular = circular;
  return s;
}

void check_axis(const char* op, int64_t axis) {
  TORCH_CHECK_VALUE(axis == 2 || axis == 3, "tokenmix.", op,
                    ": axis must be 2 (rows) or 3 (columns), got ", axis);
}

TokenMap fold_map(const char* op, int64_t C, int64_t H, int64_t W, int64_t axis, int64_t region,
                  int64_t shift, bool wrap) {
  check_axis(op, axis);
  const int64_t L = axis == 2 ? H : W;
  TORCH_CHECK_VALUE(region >= 1 && region <= L, "tokenmix.", op, ": region must lie in [1, ",
                    axis == 2 ? "H" : "W", " = ", L, "], got ", region);
  TokenMap m{};
  m.kind = MapKind::Fold;
  m.C = C;
  m.H = H;
  m.W = W;
  m.axis = static_cast<int32_t>(axis);
  m.p = region;
  m.L = L;
  m.Lp = (L + region - 1) / region * region;
  m.s = normalise_shift(shift, L, true);
  m.wrap = wrap;
  return m;
}

TokenMap fold_map_of_grid(const char* op, const char* name, int64_t channels, int64_t GH,
                          int64_t GW, int64_t axis, int64_t region, int64_t size, int64_t shift,
                          bool wrap) {
  check_axis(op, axis);
  TORCH_CHECK_VALUE(region >= 1, "tokenmix.", op, ": region must be >= 1, got ", region);
  TORCH_CHECK_VALUE(channels % region == 0, "tokenmix.", op, ": ", name, " = ", channels,
                    " must be divisible by region = ", region);
  const int64_t folded = axis == 2 ? GH : GW;
  const int64_t lo = std::max(region, (folded - 1) * region + 1), hi = folded * region;
  TORCH_CHECK_VALUE(size >= lo && size <= hi, "tokenmix.", op, ": size must lie in [", lo, ", ",
                    hi, "] (at least region = ", region, ", and ceil(size / region) equal to the ",
                    folded, " regions along axis ", axis, "), got ", size);
  return fold_map(op, channels / region, axis == 2 ? size : GH, axis == 3 ? size : GW, axis,
                  region, shift, wrap);
}

at::Tensor weight_matrix(const char* op, const at::Tensor& weight, const at::Tensor& x, int64_t K,
                         const char* what, const char* x_name) {
  TORCH_CHECK_VALUE(weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 &&
                                          weight.size(3) == 1),
                    "tokenmix.", op, ": weight must be [C_out, ", what, "] or [C_out, ", what,
                    ", 1, 1], got ", shape_str(weight));
  check_same_dtype(op, "weight", weight, x_name, x);
  check_same_device(op, "weight", weight, x_name, x);
  check_size(op, "weight", weight, 1, K, what);
  // Detached: the CPU kernels' at::parallel_for workers do not inherit the caller's grad mode, and
  // their GEMMs must not see a tensor that requires grad (the conversion may be a no-op).
  return weight.detach().reshape({weight.size(0), K}).to(acc_scalar_type(x.scalar_type())).contiguous();
}

at::Tensor bias_vector(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                       int64_t J, const char* x_name) {
  if (!bias.has_value() || !bias->defined()) {
    return at::Tensor();
  }
  check_rank(op, "bias", *bias, 1, "[C_out]");
  check_same_dtype(op, "bias", *bias, x_name, x);
  check_same_device(op, "bias", *bias, x_name, x);
  check_size(op, "bias", *bias, 0, J, "weight.size(0)");
  return bias->detach().to(acc_scalar_type(x.scalar_type())).contiguous();
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& ref, const char* ref_name,
                at::IntArrayRef shape) {
  check_map(op, "grad", grad);
  check_same_dtype(op, "grad", grad, ref_name, ref);
  check_same_device(op, "grad", grad, ref_name, ref);
  TORCH_CHECK_VALUE(grad.sizes() == shape, "tokenmix.", op, ": grad must have shape ", shape,
                    ", got ", shape_str(grad));
}

at::Tensor empty_like_format(const at::Tensor& ref, at::IntArrayRef shape) {
  return at::empty(shape, ref.options().memory_format(ref.suggest_memory_format()));
}

std::vector<int64_t> grid_shape(const at::Tensor& src, const TokenMap& m) {
  return {src.size(0), m.K(), m.GH(), m.GW()};
}

std::tuple<at::Tensor, at::Tensor> param_grads(const at::Tensor& gw, const at::Tensor& gb,
                                               const at::Tensor& weight) {
  return {gw.to(weight.scalar_type()).view(weight.sizes()), gb.to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> param_grad_buffers(const at::Tensor& weight, int64_t J, int64_t K) {
  const auto acc = weight.options().dtype(acc_scalar_type(weight.scalar_type()));
  return {at::empty({J, K}, acc), at::empty({J}, acc)};
}

}  // namespace shift
}  // namespace tokenmix
