// Windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net local windows): argument
// checks, the CPU and CUDA backends, C++ autograd and the dispatcher registrations. Schemas live
// in csrc/tokenmix.cpp.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "tokenmix/autocast.h"
#include "tokenmix/checks.h"
#include "tokenmix/op_handle.h"
#include "window_attention_cpu.h"

#if defined(TOKENMIX_WITH_CUDA)
#include "tokenmix/cuda_launch.h"
#include "tokenmix/env.h"
#include "window_attention_params.h"
#endif

namespace tokenmix {
namespace window {
namespace {

constexpr const char* kOp = "window_attention";

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

// ---- backends ---------------------------------------------------------------------------------

struct CpuBackend {
  static void forward(const Problem& p, at::Tensor& out, at::Tensor& lse) {
    window_attention_cpu_kernels().forward(p, out, lse);
  }
  static void backward(const Problem& p, const at::Tensor& grad, const at::Tensor& lse,
                       at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
    window_attention_cpu_kernels().backward(p, grad, lse, dq, dk, dv, dbias);
  }
};

#if defined(TOKENMIX_WITH_CUDA)
struct CudaBackend {
  static WindowParams params(const Problem& p) {
    WindowParams w{};
    w.q = p.q.const_data_ptr();
    w.k = p.k.const_data_ptr();
    w.v = p.v.const_data_ptr();
    w.bias_table = p.bias_table.defined() ? p.bias_table.const_data_ptr() : nullptr;
    w.q_strides = {p.q.stride(0), p.q.stride(1), p.q.stride(2), p.q.stride(3)};
    w.k_strides = {p.k.stride(0), p.k.stride(1), p.k.stride(2), p.k.stride(3)};
    w.v_strides = {p.v.stride(0), p.v.stride(1), p.v.stride(2), p.v.stride(3)};
    w.geo = p.geo;
    w.B = p.k.size(0);
    w.heads = p.k.size(3);
    w.d = p.k.size(4);
    w.scale = p.scale;
    w.global_q = p.global_q;
    w.dtype = to_dtype(p.k.scalar_type());
    static const bool tensor_cores = env_enabled("TOKENMIX_WINDOW_TENSOR_CORES");
    w.tensor_cores = tensor_cores;
    return w;
  }
  // The kernels keep a window in shared memory and a query row in one warp's registers.
  static void check_limits(const WindowParams& w, bool backward) {
    TORCH_CHECK_VALUE(w.geo.tokens() <= kMaxWindowTokens, "tokenmix.", kOp,
                      ": the CUDA kernel takes windows of at most ", kMaxWindowTokens,
                      " tokens, got ", w.geo.wh, " x ", w.geo.ww);
    TORCH_CHECK_VALUE(w.d <= kMaxHeadDim, "tokenmix.", kOp, ": the CUDA kernel takes head_dim <= ",
                      kMaxHeadDim, ", got ", w.d);
    int device = 0, limit = 0;
    check_launch(cudaGetDevice(&device), "cudaGetDevice");
    check_launch(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                 "cudaDeviceGetAttribute");
    const int64_t need = window_attention_smem_bytes(w, backward);
    TORCH_CHECK_VALUE(need <= limit, "tokenmix.", kOp, ": window ", w.geo.wh, " x ", w.geo.ww,
                      " with head_dim ", w.d, " needs ", need, " bytes of shared memory per block",
                      backward ? " in backward" : "", ", the device allows ", limit);
  }
  static void forward(const Problem& p, at::Tensor& out, at::Tensor& lse) {
    WindowParams w = params(p);
    check_limits(w, false);
    w.out = out.mutable_data_ptr();
    w.lse = lse.defined() ? lse.mutable_data_ptr() : nullptr;
    check_launch(window_attention_forward_cuda(w, current_stream()), "window_attention");
  }
  static void backward(const Problem& p, const at::Tensor& grad, const at::Tensor& lse,
                       at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
    WindowParams w = params(p);
    check_limits(w, true);
    const int64_t B = w.B, nW = p.geo.windows(), T = p.geo.tokens();
    const auto acc = p.k.options().dtype(acc_scalar_type(p.k.scalar_type()));
    // Per-(image, window, head) partials, summed in a fixed order by the reduction kernels.
    at::Tensor dbias_part, dbias_chunks, dq_part;
    if (p.bias_table.defined()) {
      dbias_part = at::empty({B * nW * w.heads, p.geo.table_size()}, acc);
      dbias_chunks = at::empty({dbias_chunk_count(B * nW), w.heads, p.geo.table_size()}, acc);
      w.dbias_partial = dbias_part.mutable_data_ptr();
      w.dbias_chunks = dbias_chunks.mutable_data_ptr();
      w.dbias = dbias.mutable_data_ptr();
    }
    if (p.global_q) {
      // Zeroed: rows of window tokens outside the map (partial windows) are never written.
      dq_part = at::zeros({B, nW, T, w.heads, w.d}, acc);
      w.dq_partial = dq_part.mutable_data_ptr();
    }
    w.grad = grad.const_data_ptr();
    w.lse = const_cast<void*>(lse.const_data_ptr());
    w.dq = dq.mutable_data_ptr();
    w.dk = dk.mutable_data_ptr();
    w.dv = dv.mutable_data_ptr();
    check_launch(window_attention_backward_cuda(w, current_stream()), "window_attention_backward");
  }
};
#endif

// ---- ops --------------------------------------------------------------------------------------

// The output, and the row log-sum-exp when `with_lse` (only backward needs it).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, at::IntArrayRef window_size,
                                               at::IntArrayRef shift_size,
                                               const std::optional<at::Tensor>& bias_table,
                                               std::optional<double> scale, bool with_lse) {
  const c10::DeviceGuard guard(k.device());
  const Problem p = make_problem(q, k, v, window_size, shift_size, bias_table, scale);
  at::Tensor out = at::empty(k.sizes(), k.options());
  at::Tensor lse;
  if (with_lse) {
    lse = at::empty({k.size(0), p.geo.windows(), p.geo.tokens(), k.size(3)},
                    k.options().dtype(acc_scalar_type(k.scalar_type())));
  }
  if (out.numel() > 0) {
    Backend::forward(p, out, lse);
  }
  return {out, lse};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, at::IntArrayRef window_size,
                                                at::IntArrayRef shift_size,
                                                const std::optional<at::Tensor>& bias_table,
                                                std::optional<double> scale) {
  return run_forward<Backend>(q, k, v, window_size, shift_size, bias_table, scale, true);
}

template <class Backend>
at::Tensor window_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                 const std::optional<at::Tensor>& bias_table,
                                 std::optional<double> scale) {
  return std::get<0>(
      run_forward<Backend>(q, k, v, window_size, shift_size, bias_table, scale, false));
}

template <class Backend>
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
    Backend::backward(p, g, lse.contiguous(), dq, dk, dv, dbias);
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

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class WindowAttentionFn : public torch::autograd::Function<WindowAttentionFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, at::IntArrayRef window_size,
                            at::IntArrayRef shift_size, const std::optional<at::Tensor>& bias_table,
                            std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        op_handle<decltype(forward_impl<CpuBackend>)>("tokenmix::window_attention_fwd");
    auto [out, lse] = op.call(q, k, v, window_size, shift_size, bias_table, scale);
    const at::Tensor table = bias_table.has_value() ? *bias_table : at::Tensor();
    ctx->save_for_backward({q, k, v, lse, table});
    ctx->saved_data["window_size"] = window_size.vec();
    ctx->saved_data["shift_size"] = shift_size.vec();
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        op_handle<decltype(backward_impl<CpuBackend>)>("tokenmix::window_attention_backward");
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> table =
        saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const auto window = ctx->saved_data["window_size"].toIntVector();
    const auto shift = ctx->saved_data["shift_size"].toIntVector();
    const auto scale = ctx->saved_data["scale"].toOptional<double>();
    auto [dq, dk, dv, dbias] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], window, shift, table, scale);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), table.has_value() ? dbias : at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor window_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                     const std::optional<at::Tensor>& bias_table,
                                     std::optional<double> scale) {
  return WindowAttentionFn::apply(q, k, v, window_size, shift_size, bias_table, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("window_attention", &window_attention_impl<CpuBackend>);
  m.impl("window_attention_fwd", &forward_impl<CpuBackend>);
  m.impl("window_attention_backward", &backward_impl<CpuBackend>);
}

#if defined(TOKENMIX_WITH_CUDA)
TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("window_attention", &window_attention_impl<CudaBackend>);
  m.impl("window_attention_fwd", &forward_impl<CudaBackend>);
  m.impl("window_attention_backward", &backward_impl<CudaBackend>);
}
#endif

TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {
  m.impl("window_attention", &window_attention_autograd);
}

TM_AUTOCAST("window_attention", kLowerPrecision)

}  // namespace window
}  // namespace tokenmix
