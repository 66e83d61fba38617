// HorNet's recursive gated convolution (gnConv): argument checks, the CPU and CUDA backends, C++
// autograd and the dispatcher registrations. Schemas live in csrc/tokenmix.cpp.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "gnconv_cpu.h"
#include "tokenmix/checks.h"
#include "tokenmix/autocast.h"
#include "tokenmix/op_handle.h"

#if defined(TOKENMIX_WITH_CUDA)
#include "gnconv_params.h"
#include "tokenmix/cuda_launch.h"
#include "tokenmix/env.h"
#endif

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

// ---- backends ---------------------------------------------------------------------------------

struct CpuBackend {
  static void forward(const Problem& p, at::Tensor& out) { gnconv_cpu_kernels().forward(p, out); }
  static void backward(const Problem& p, const at::Tensor& grad, Grads& g) {
    gnconv_cpu_kernels().backward(p, grad, g);
  }
};

#if defined(TOKENMIX_WITH_CUDA)
// Channels-last rows throughout. proj_in and proj_out are cuBLAS GEMMs (through ATen); the
// depthwise conv with its bias, scale and first gate is one kernel; each pws step is one CUTLASS
// GEMM with its gate in the epilogue (fp16/bf16 with 16-byte aligned widths), else an ATen GEMM
// and an elementwise product. TOKENMIX_GNCONV_CUTLASS=0 forces the second form, for comparison.
struct CudaBackend {
  static at::Tensor mat(const at::Tensor& w) { return w.view({w.size(0), w.size(1)}); }
  // The depthwise kernels read the weight tap-major, [k * k, S].
  static at::Tensor taps_major(const at::Tensor& w_dw) {
    return w_dw.view({w_dw.size(0), w_dw.size(2) * w_dw.size(3)}).t().contiguous();
  }

  static bool cutlass_enabled() {
    static const bool on = env_enabled("TOKENMIX_GNCONV_CUTLASS");
    return on;
  }

  // The fused GEMM when it supports these operands; false leaves the work to the caller.
  static bool try_gated_gemm(GatedGemmParams& g, const at::Tensor& a, const at::Tensor& w,
                             const at::Tensor& gate, const at::Tensor& z, const at::Tensor& t) {
    const auto unit = [](const at::Tensor& m) { return !m.defined() || m.stride(1) == 1; };
    if (!cutlass_enabled() || !unit(a) || !unit(w) || !unit(gate) || !unit(z) || !unit(t)) return false;
    g.M = a.size(0);
    g.N = z.size(1);
    g.K = a.size(1);
    g.a = a.const_data_ptr();
    g.lda = a.stride(0);
    g.w = w.const_data_ptr();
    g.ldw = w.stride(0);
    g.gate = gate.const_data_ptr();
    g.ld_gate = gate.stride(0);
    g.z = z.mutable_data_ptr();
    g.ld_z = z.stride(0);
    g.t = t.defined() ? t.mutable_data_ptr() : nullptr;
    g.ld_t = t.defined() ? t.stride(0) : 0;
    g.dtype = to_dtype(a.scalar_type());
    if (!gnconv_gated_gemm_supported(g)) return false;
    check_launch(gnconv_gated_gemm_cuda(g, current_stream()), "gnconv_gated_gemm");
    return true;
  }

  // Forward intermediates, [N, channels] rows.
  struct Chain {
    at::Tensor x_rows, F, G;        // x, proj_in output, gates (scaled dwconv)
    std::vector<at::Tensor> y, z;   // y_i (gated), z_i (pws output before its gate; z_0 unused)
    at::Tensor w_taps;              // the depthwise weight tap-major, [k * k, S]
  };

  static at::Tensor gate_of(const Problem& p, const Chain& c, int64_t j) {
    return c.G.narrow(1, p.lay.offs[j], p.lay.dims[j]);
  }

  // y_i = (y_{i-1} W_i^T + b_i) * g_i; z_i (before the gate) only when backward needs it.
  static void pws_step(const Problem& p, Chain& c, int64_t i, bool keep_z) {
    const at::Tensor& y_prev = c.y.back();
    const at::Tensor w = mat(p.w_pw[i - 1]), gate = gate_of(p, c, i);
    at::Tensor y = at::empty({y_prev.size(0), p.lay.dims[i]}, y_prev.options());
    at::Tensor z = keep_z ? at::empty_like(y) : at::Tensor();
    GatedGemmParams g{};
    g.mode = GateMode::kForward;
    g.bias = p.b_pw[i - 1].const_data_ptr();
    g.scale = 1.0f;
    if (!try_gated_gemm(g, y_prev, w, gate, y, z)) {
      z = at::addmm(p.b_pw[i - 1], y_prev, w.t());
      at::mul_out(y, z, gate);
    }
    c.y.push_back(y);
    c.z.push_back(z);
  }

  static Chain chain(const Problem& p, bool keep_z) {
    const Layout& L = p.lay;
    const int64_t B = p.x.size(0), N = B * p.geo.H * p.geo.W;
    Chain c;
    c.x_rows = p.x.permute({0, 2, 3, 1}).reshape({N, L.dim});
    c.F = at::addmm(p.b_in, c.x_rows, mat(p.w_in).t());
    c.G = at::empty({N, L.S}, c.F.options());
    at::Tensor y0 = at::empty({N, L.dims[0]}, c.F.options());
    c.w_taps = taps_major(p.w_dw);
    DepthwiseParams d{};
    d.src = static_cast<const char*>(c.F.const_data_ptr()) + L.dims[0] * c.F.element_size();
    d.ld_src = L.proj_width();
    d.weight = c.w_taps.const_data_ptr();
    d.bias = p.b_dw.const_data_ptr();
    d.scale = static_cast<float>(p.scale);
    d.dst = c.G.mutable_data_ptr();
    d.ld_dst = L.S;
    d.gate_in = c.F.const_data_ptr();
    d.ld_gate_in = L.proj_width();
    d.gate_out = y0.mutable_data_ptr();
    d.ld_gate_out = L.dims[0];
    d.gate_channels = L.dims[0];
    d.geo = p.geo;
    d.B = B;
    d.S = L.S;
    d.dtype = to_dtype(p.x.scalar_type());
    check_launch(gnconv_depthwise_cuda(d, current_stream()), "gnconv_depthwise");
    c.y.push_back(y0);
    c.z.push_back(at::Tensor());
    for (int64_t i = 1; i < L.order; ++i) pws_step(p, c, i, keep_z);
    return c;
  }

  // Step j of the chain, backwards: dy_j = a W is dL/dy_j. Writes scale * dy_j * pre_j, the
  // gradient of dwconv block j, into dD (pre_j is z_j, or proj_in's first split for j = 0), and
  // returns dy_j * g_j: dL/dz_j for j >= 1; for j = 0 the first split's gradient, written into dF.
  static at::Tensor gate_backward(const Problem& p, const Chain& c, int64_t j, const at::Tensor& a,
                                  const at::Tensor& w, at::Tensor& dD, at::Tensor& dF) {
    const Layout& L = p.lay;
    const at::Tensor gate = gate_of(p, c, j), dDj = dD.narrow(1, L.offs[j], L.dims[j]);
    const at::Tensor pre = j == 0 ? c.F.narrow(1, 0, L.dims[0]) : c.z[j];
    at::Tensor dz = j == 0 ? dF.narrow(1, 0, L.dims[0]) : at::empty({a.size(0), L.dims[j]}, a.options());
    GatedGemmParams g{};
    g.mode = GateMode::kBackward;
    g.pre = pre.const_data_ptr();
    g.ld_pre = pre.stride(0);
    g.scale = static_cast<float>(p.scale);
    if (!try_gated_gemm(g, a, w, gate, dz, dDj)) {
      const at::Tensor dy = at::mm(a, w);
      dDj.copy_(dy * pre * p.scale);
      at::mul_out(dz, dy, gate);
    }
    return dz;
  }

  // [N, dim] rows -> dst [B, dim, H, W] in its own memory format.
  static void store_rows(const Problem& p, const at::Tensor& rows, at::Tensor& dst) {
    dst.copy_(rows.view({p.x.size(0), p.geo.H, p.geo.W, p.lay.dim}).permute({0, 3, 1, 2}));
  }

  static void forward(const Problem& p, at::Tensor& out) {
    const Chain c = chain(p, false);
    store_rows(p, at::addmm(p.b_out, c.y.back(), mat(p.w_out).t()), out);
  }

  static void backward(const Problem& p, const at::Tensor& grad, Grads& g) {
    const Layout& L = p.lay;
    const int64_t B = p.x.size(0), N = B * p.geo.H * p.geo.W, n = L.order, d0 = L.dims[0];
    const Chain c = chain(p, true);
    const at::Tensor dO = grad.permute({0, 2, 3, 1}).reshape({N, L.dim});
    g.w_out.copy_(at::mm(dO.t(), c.y.back()).view(g.w_out.sizes()));
    g.b_out.copy_(dO.sum(0));
    at::Tensor dD = at::empty({N, L.S}, c.F.options());
    at::Tensor dF = at::empty_like(c.F);
    at::Tensor dz = gate_backward(p, c, n - 1, dO, mat(p.w_out), dD, dF);
    for (int64_t i = n - 1; i >= 1; --i) {
      g.w_pw[i - 1].copy_(at::mm(dz.t(), c.y[i - 1]).view(g.w_pw[i - 1].sizes()));
      g.b_pw[i - 1].copy_(dz.sum(0));
      dz = gate_backward(p, c, i - 1, dz, mat(p.w_pw[i - 1]), dD, dF);
    }

    DepthwiseParams d{};
    d.src = dD.const_data_ptr();
    d.ld_src = L.S;
    d.weight = c.w_taps.const_data_ptr();
    d.scale = 1.0f;
    d.flip = true;
    d.dst = static_cast<char*>(dF.mutable_data_ptr()) + d0 * dF.element_size();
    d.ld_dst = L.proj_width();
    d.geo = p.geo;
    d.B = B;
    d.S = L.S;
    d.dtype = to_dtype(p.x.scalar_type());
    check_launch(gnconv_depthwise_cuda(d, current_stream()), "gnconv_depthwise (transposed)");

    // About 8 output rows per chunk: enough threads to fill the GPU, a partial buffer of a few MB.
    const int64_t chunks = std::clamp<int64_t>(B * p.geo.H / 8, 1, 512);
    at::Tensor part = at::empty({chunks, L.S, p.geo.taps()},
                                c.F.options().dtype(acc_scalar_type(p.x.scalar_type())));
    DepthwiseGradParams w{};
    w.src = static_cast<const char*>(c.F.const_data_ptr()) + d0 * c.F.element_size();
    w.ld_src = L.proj_width();
    w.dy = dD.const_data_ptr();
    w.ld_dy = L.S;
    w.partial = part.mutable_data_ptr();
    w.chunks = chunks;
    w.geo = p.geo;
    w.B = B;
    w.S = L.S;
    w.dtype = d.dtype;
    check_launch(gnconv_depthwise_weight_grad_cuda(w, current_stream()), "gnconv_depthwise_weight_grad");
    g.w_dw.copy_(part.sum(0).view(g.w_dw.sizes()));
    g.b_dw.copy_(dD.sum(0));

    g.w_in.copy_(at::mm(dF.t(), c.x_rows).view(g.w_in.sizes()));
    g.b_in.copy_(dF.sum(0));
    store_rows(p, at::mm(dF, mat(p.w_in)), g.x);
  }
};
#endif

// ---- ops --------------------------------------------------------------------------------------

template <class Backend>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                        const at::Tensor& w_dw, const at::Tensor& b_dw, at::TensorList w_pw,
                        at::TensorList b_pw, const at::Tensor& w_out, const at::Tensor& b_out,
                        int64_t order, double scale) {
  const c10::DeviceGuard guard(x.device());
  const Problem p = make_problem(x, w_in, b_in, w_dw, b_dw, w_pw, b_pw, w_out, b_out, order, scale);
  at::Tensor out = at::empty_like(p.x);
  if (out.numel() > 0) Backend::forward(p, out);
  return out;
}

using GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

template <class Backend>
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
    Backend::backward(p, grad.contiguous(p.x.suggest_memory_format()), g);
  }
  return {g.x, g.w_in, g.b_in, g.w_dw, g.b_dw, g.w_pw, g.b_pw, g.w_out, g.b_out};
}

// ---- autograd ---------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GnConvFn : public torch::autograd::Function<GnConvFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_in,
                            const at::Tensor& b_in, const at::Tensor& w_dw, const at::Tensor& b_dw,
                            at::TensorList w_pw, at::TensorList b_pw, const at::Tensor& w_out,
                            const at::Tensor& b_out, int64_t order, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<decltype(forward_impl<CpuBackend>)>("tokenmix::gnconv");
    variable_list saved{x, w_in, b_in, w_dw, b_dw, w_out, b_out};
    saved.insert(saved.end(), w_pw.begin(), w_pw.end());
    saved.insert(saved.end(), b_pw.begin(), b_pw.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["order"] = order;
    ctx->saved_data["scale"] = scale;
    return op.call(x, w_in, b_in, w_dw, b_dw, w_pw, b_pw, w_out, b_out, order, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<decltype(backward_impl<CpuBackend>)>("tokenmix::gnconv_backward");
    const auto s = ctx->get_saved_variables();
    const int64_t order = ctx->saved_data["order"].toInt();
    const std::vector<at::Tensor> w_pw(s.begin() + 7, s.begin() + 7 + (order - 1));
    const std::vector<at::Tensor> b_pw(s.begin() + 7 + (order - 1), s.end());
    auto [gx, gwi, gbi, gwd, gbd, gwp, gbp, gwo, gbo] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], w_pw, b_pw, s[5], s[6], order,
                ctx->saved_data["scale"].toDouble());
    variable_list out{gx, gwi, gbi, gwd, gbd};
    out.insert(out.end(), gwp.begin(), gwp.end());
    out.insert(out.end(), gbp.begin(), gbp.end());
    out.insert(out.end(), {gwo, gbo, at::Tensor(), at::Tensor()});
    return out;
  }
};

at::Tensor gnconv_autograd(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                           const at::Tensor& w_dw, const at::Tensor& b_dw, at::TensorList w_pw,
                           at::TensorList b_pw, const at::Tensor& w_out, const at::Tensor& b_out,
                           int64_t order, double scale) {
  return GnConvFn::apply(x, w_in, b_in, w_dw, b_dw, w_pw, b_pw, w_out, b_out, order, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  m.impl("gnconv", &forward_impl<CpuBackend>);
  m.impl("gnconv_backward", &backward_impl<CpuBackend>);
}

#if defined(TOKENMIX_WITH_CUDA)
TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  m.impl("gnconv", &forward_impl<CudaBackend>);
  m.impl("gnconv_backward", &backward_impl<CudaBackend>);
}
#endif

TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {
  m.impl("gnconv", &gnconv_autograd);
}

TM_AUTOCAST("gnconv", kLowerPrecision)

}  // namespace gnconv
}  // namespace tokenmix
