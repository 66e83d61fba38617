#include "tokenmix/checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>
#include <tuple>
#include <utility>

namespace tokenmix {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, "tokenmix.", op, ": ", name, " must have ", rank,
                    " dimensions ", layout, ", got ", t.dim(), " (shape ", shape_str(t), ")");
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   "tokenmix.", op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", s);
}

void check_int64(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "tokenmix.", op, ": ", name,
                   " must be int64, got ", t.scalar_type());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "tokenmix.", op, ": ", name,
                   " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "tokenmix.", op, ": ", name,
                    " must be on the device of ", ref_name, " (", ref.device(), "), got ",
                    t.device());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "tokenmix.", op, ": ", name, ".size(", dim,
                    ") must equal ", what, " = ", expected, ", got ", t.size(dim), " (shape ",
                    shape_str(t), ")");
}

namespace {

// The smallest and largest entry of a CPU index, read in place: a loop over the entries costs
// far less than a reduction op and two .item() calls on the small indices these ops take.
template <typename I>
std::pair<int64_t, int64_t> host_bounds(const at::Tensor& index) {
  const at::Tensor c = index.contiguous();
  const I* p = c.const_data_ptr<I>();
  I lo = p[0], hi = p[0];
  for (int64_t i = 1, n = c.numel(); i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  return {lo, hi};
}

}  // namespace

void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t upper) {
  if (index.numel() == 0) {
    return;
  }
  int64_t lo, hi;
  if (index.is_cpu()) {
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "check_index_range",
                            [&] { std::tie(lo, hi) = host_bounds<index_t>(index); });
  } else {
    // Both bounds in one device-to-host copy: the one sync this check costs.
    const auto [lo_t, hi_t] = at::aminmax(index);
    const at::Tensor bounds = at::stack({lo_t, hi_t}).to(at::kCPU, at::kLong);
    lo = bounds.const_data_ptr<int64_t>()[0];
    hi = bounds.const_data_ptr<int64_t>()[1];
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < upper, "tokenmix.", op, ": ", name,
                    " entries must lie in [0, ", upper, "), got values in [", lo, ", ", hi, "]");
}

at::Tensor with_unit_channel_stride(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1) ? t : t.contiguous();
}

std::pair<int64_t, int64_t> int_pair(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2, "tokenmix.", op, ": ", name, " must have 2 entries (h, w), got ",
                    v.size());
  return {v[0], v[1]};
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace tokenmix
