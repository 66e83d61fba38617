// Argument checks and the maps of the shifted / rearranged token-mixing family's ops: what
// shift.cpp's ops check before they call the kernel table, and the TokenMaps (shift_math.h) they
// build from their arguments. Messages name the op, the argument, the expectation and the value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

#include "shift_math.h"

namespace tokenmix {
namespace shift {

// x is a 4-D [B, C, H, W] floating tensor.
void check_map(const char* op, const char* name, const at::Tensor& x);
void check_axis(const char* op, int64_t axis);
// grad has the given shape and the dtype and device of ref.
void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& ref, const char* ref_name,
                at::IntArrayRef shape);

// The element strides of a [B, C, H, W] tensor, as the kernels take them.
Strides4 strides_of(const at::Tensor& t);

// The map that reads t itself.
TokenMap identity_map(const at::Tensor& t);

// A shift map over x (shifts: G (dy, dx) pairs flattened; groups: G channel counts, or empty for
// equal groups; mode "zeros" or "circular"), with the per-channel (dy, dx) table it points to, on
// x's device: keep the ShiftSpec alive while the map is in use.
struct ShiftSpec {
  TokenMap map;
  at::Tensor table;
};
ShiftSpec shift_spec(const char* op, const at::Tensor& x, at::IntArrayRef shifts,
                     at::IntArrayRef groups, c10::string_view mode);

// The fold map of a source map [*, C, H, W] along axis with region p (1 <= p <= the axis length)
// and a cyclic shift; wrap as in TokenMap.
TokenMap fold_map(const char* op, int64_t C, int64_t H, int64_t W, int64_t axis, int64_t region,
                  int64_t shift, bool wrap);
// The fold map of a grid [*, channels, GH, GW] whose unfolded axis has length `size` (`name` says
// where the channels come from, for the messages).
TokenMap fold_map_of_grid(const char* op, const char* name, int64_t channels, int64_t GH,
                          int64_t GW, int64_t axis, int64_t region, int64_t size, int64_t shift,
                          bool wrap);

// weight [J, K] or [J, K, 1, 1] (x's dtype and device) as a [J, K] matrix in the accumulation
// type, contiguous and detached; `what` names K's origin, e.g. "x.size(1)".
at::Tensor weight_matrix(const char* op, const at::Tensor& weight, const at::Tensor& x, int64_t K,
                         const char* what, const char* x_name = "x");
// bias [J] in the accumulation type, or undefined when absent.
at::Tensor bias_vector(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                       int64_t J, const char* x_name = "x");

// An empty tensor of `shape` in ref's suggested memory format (the format every op returns).
at::Tensor empty_like_format(const at::Tensor& ref, at::IntArrayRef shape);
// The grid [B, K, GH, GW] a map reads from src.
std::vector<int64_t> grid_shape(const at::Tensor& src, const TokenMap& m);
// Weight and bias gradients (accumulation type) in the weight's own shape and dtype.
std::tuple<at::Tensor, at::Tensor> param_grads(const at::Tensor& gw, const at::Tensor& gb,
                                               const at::Tensor& weight);
// [J, K] and [J] gradient buffers in the accumulation type, on the weight's device, for
// Kernels::weight_grad to overwrite.
std::tuple<at::Tensor, at::Tensor> param_grad_buffers(const at::Tensor& weight, int64_t J, int64_t K);

}  // namespace shift
}  // namespace tokenmix
