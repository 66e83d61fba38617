// The CUDA side of HorNet's gnConv, host half. Channels-last rows throughout. proj_in and
// proj_out are cuBLAS GEMMs (through ATen, current stream); the depthwise conv with its bias,
// scale and first gate is one kernel (gnconv_cuda.cu); each pws step is one CUTLASS GEMM with its
// gate in the epilogue (gnconv_gemm_cutlass.cu; fp16/bf16 with 16-byte aligned widths), else an
// ATen GEMM and an elementwise product. TOKENMIX_GNCONV_CUTLASS=0 forces the second form, for
// comparison. Built only with CUDA.

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "gnconv_params.h"
#include "gnconv_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/cuda_launch.h"
#include "tokenmix/env.h"

namespace tokenmix {
namespace gnconv {
namespace {

at::Tensor mat(const at::Tensor& w) { return w.view({w.size(0), w.size(1)}); }

// The depthwise kernels read the weight tap-major, [k * k, S].
at::Tensor taps_major(const at::Tensor& w_dw) {
  return w_dw.view({w_dw.size(0), w_dw.size(2) * w_dw.size(3)}).t().contiguous();
}

bool cutlass_enabled() {
  static const bool on = env_enabled("TOKENMIX_GNCONV_CUTLASS");
  return on;
}

// The fused GEMM when it supports these operands; false leaves the work to the caller.
bool try_gated_gemm(GatedGemmParams& g, const at::Tensor& a, const at::Tensor& w,
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

at::Tensor gate_of(const Problem& p, const Chain& c, int64_t j) {
  return c.G.narrow(1, p.lay.offs[j], p.lay.dims[j]);
}

// y_i = (y_{i-1} W_i^T + b_i) * g_i; z_i (before the gate) only when backward needs it.
void pws_step(const Problem& p, Chain& c, int64_t i, bool keep_z) {
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

Chain chain(const Problem& p, bool keep_z) {
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

// The gradients whose column sums are bias gradients, side by side in one [N, width] buffer so
// that one reduction gives them all: dF (proj_in's output, 2 dim: b_in), dD (the depthwise
// output, S: b_dw) and dz_j = dL/dz_j of the pws steps j = 1 .. order - 1 (dims[j]: b_pw[j - 1]),
// dz_j from column 2 dim + S + offs[j] - dims[0]. Every column is written once by the backward
// pass before the sum. The dz_j stay alive until the end (N * (S - dims[0]) elements more at the
// peak than freeing each after its step).
struct BackwardBuffer {
  at::Tensor all, dF, dD;
  int64_t dz_base;
  const Layout* lay;

  BackwardBuffer(const Layout& L, int64_t N, const at::TensorOptions& opt) : lay(&L) {
    const int64_t wF = L.proj_width();
    dz_base = wF + L.S - L.dims[0];
    all = at::empty({N, dz_base + L.S}, opt);
    dF = all.narrow(1, 0, wF);
    dD = all.narrow(1, wF, L.S);
  }
  at::Tensor dz(int64_t j) const { return all.narrow(1, dz_base + lay->offs[j], lay->dims[j]); }
};

// Step j of the chain, backwards: dy_j = a W is dL/dy_j. Writes scale * dy_j * pre_j, the
// gradient of dwconv block j, into dD (pre_j is z_j, or proj_in's first split for j = 0), and
// returns dy_j * g_j: dL/dz_j for j >= 1, written into its columns of the backward buffer; for
// j = 0 the first split's gradient, written into dF.
at::Tensor gate_backward(const Problem& p, const Chain& c, int64_t j, const at::Tensor& a,
                         const at::Tensor& w, const BackwardBuffer& buf) {
  const Layout& L = p.lay;
  const at::Tensor gate = gate_of(p, c, j), dDj = buf.dD.narrow(1, L.offs[j], L.dims[j]);
  const at::Tensor pre = j == 0 ? c.F.narrow(1, 0, L.dims[0]) : c.z[j];
  at::Tensor dz = j == 0 ? buf.dF.narrow(1, 0, L.dims[0]) : buf.dz(j);
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

// dst [B, dim, H, W] as [N, dim] rows when it is dense channels_last (a view: a GEMM writes it
// directly); undefined for NCHW, which takes a GEMM into rows and a permuting copy.
at::Tensor rows_view(const Problem& p, at::Tensor& dst) {
  if (!dst.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::Tensor();
  return dst.permute({0, 2, 3, 1}).view({dst.size(0) * p.geo.H * p.geo.W, p.lay.dim});
}

// [N, dim] rows -> dst [B, dim, H, W] in its own memory format.
void store_rows(const Problem& p, const at::Tensor& rows, at::Tensor& dst) {
  dst.copy_(rows.view({p.x.size(0), p.geo.H, p.geo.W, p.lay.dim}).permute({0, 3, 1, 2}));
}

void forward(const Problem& p, at::Tensor& out) {
  const Chain c = chain(p, false);
  at::Tensor rows = rows_view(p, out);
  if (rows.defined()) {
    at::addmm_out(rows, p.b_out, c.y.back(), mat(p.w_out).t());
  } else {
    store_rows(p, at::addmm(p.b_out, c.y.back(), mat(p.w_out).t()), out);
  }
}

void backward(const Problem& p, const at::Tensor& grad, Grads& g) {
  const Layout& L = p.lay;
  const int64_t B = p.x.size(0), N = B * p.geo.H * p.geo.W, n = L.order, d0 = L.dims[0];
  const Chain c = chain(p, true);
  const at::Tensor dO = grad.permute({0, 2, 3, 1}).reshape({N, L.dim});
  g.w_out.copy_(at::mm(dO.t(), c.y.back()).view(g.w_out.sizes()));
  g.b_out.copy_(dO.sum(0));
  const BackwardBuffer buf(L, N, c.F.options());
  const at::Tensor& dD = buf.dD;
  const at::Tensor& dF = buf.dF;
  at::Tensor dz = gate_backward(p, c, n - 1, dO, mat(p.w_out), buf);
  for (int64_t i = n - 1; i >= 1; --i) {
    g.w_pw[i - 1].copy_(at::mm(dz.t(), c.y[i - 1]).view(g.w_pw[i - 1].sizes()));
    dz = gate_backward(p, c, i - 1, dz, mat(p.w_pw[i - 1]), buf);
  }

  DepthwiseParams d{};
  d.src = dD.const_data_ptr();
  d.ld_src = dD.stride(0);
  d.weight = c.w_taps.const_data_ptr();
  d.scale = 1.0f;
  d.flip = true;
  d.dst = static_cast<char*>(dF.mutable_data_ptr()) + d0 * dF.element_size();
  d.ld_dst = dF.stride(0);
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
  w.ld_dy = dD.stride(0);
  w.partial = part.mutable_data_ptr();
  w.chunks = chunks;
  w.geo = p.geo;
  w.B = B;
  w.S = L.S;
  w.dtype = d.dtype;
  check_launch(gnconv_depthwise_weight_grad_cuda(w, current_stream()), "gnconv_depthwise_weight_grad");
  g.w_dw.copy_(part.sum(0).view(g.w_dw.sizes()));

  const at::Tensor sums = buf.all.sum(0);
  g.b_in.copy_(sums.narrow(0, 0, L.proj_width()));
  g.b_dw.copy_(sums.narrow(0, L.proj_width(), L.S));
  for (int64_t i = 1; i < n; ++i) g.b_pw[i - 1].copy_(sums.narrow(0, buf.dz_base + L.offs[i], L.dims[i]));

  g.w_in.copy_(at::mm(dF.t(), c.x_rows).view(g.w_in.sizes()));
  at::Tensor x_rows = rows_view(p, g.x);
  if (x_rows.defined()) {
    at::mm_out(x_rows, dF, mat(p.w_in));
  } else {
    store_rows(p, at::mm(dF, mat(p.w_in)), g.x);
  }
}

}  // namespace

TM_DEFINE_KERNELS(gnconv_cuda_kernels, &forward, &backward)

}  // namespace gnconv
}  // namespace tokenmix
