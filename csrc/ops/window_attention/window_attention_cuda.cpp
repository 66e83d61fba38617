// The CUDA side of windowed attention, host half: checks the limits of the kernels, fills their
// torch-free parameter struct (window_attention_params.h), allocates the partial sums of the
// deterministic backward reductions and launches window_attention_cuda.cu on the current stream.
// Built only with CUDA.

#include <ATen/ATen.h>

#include "tokenmix/checks.h"
#include "tokenmix/cuda_launch.h"
#include "tokenmix/env.h"
#include "window_attention_params.h"
#include "window_attention_problem.h"

namespace tokenmix {
namespace window_attention {
namespace {

WindowParams params(const Problem& p) {
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
void check_limits(const WindowParams& w, bool backward) {
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

void forward(const Problem& p, at::Tensor& out, at::Tensor& lse) {
  WindowParams w = params(p);
  check_limits(w, false);
  w.out = out.mutable_data_ptr();
  w.lse = lse.defined() ? lse.mutable_data_ptr() : nullptr;
  check_launch(window_attention_forward_cuda(w, current_stream()), "window_attention");
}

void backward(const Problem& p, const at::Tensor& grad, const at::Tensor& lse, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
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

}  // namespace

TM_DEFINE_KERNELS(window_attention_cuda_kernels, &forward, &backward)

}  // namespace window_attention
}  // namespace tokenmix
