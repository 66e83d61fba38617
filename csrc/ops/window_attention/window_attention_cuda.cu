// CUDA launchers of windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net
// local windows): each picks the kernel family for the problem. fp16/bf16 with head_dim 32 and
// windows of <= 64 tokens on sm_80+ run the tensor-core kernels (window_attention_tc.cu), all else
// the SIMT kernels (window_attention_simt.cu); backward then runs the deterministic reductions
// (window_attention_reduce.cu). TOKENMIX_WINDOW_TENSOR_CORES=0 (WindowParams::tensor_cores) keeps
// to the SIMT kernels, for comparison.

#include "window_attention_cuda.cuh"

namespace tokenmix {
namespace window_attention {

namespace {

bool aligned16(const void* ptr, const WindowParams& p, const Strides4& s) {
  return rows_aligned16(reinterpret_cast<uintptr_t>(ptr), dtype_size(p.dtype), p.d, s.b, s.y, s.x,
                        s.h);
}

// Whether every row the kernels load (q, k, v; grad in backward, contiguous) can be read in
// 16-byte pieces; views (a packed qkv, a channel slice) may not be.
bool rows_vectorizable(const WindowParams& p, bool backward) {
  bool ok = aligned16(p.q, p, p.q_strides) && aligned16(p.k, p, p.k_strides) &&
            aligned16(p.v, p, p.v_strides);
  if (backward) {
    Strides4 contiguous{};
    contiguous_strides(p.geo, p.heads, p.d, &contiguous.b, &contiguous.y, &contiguous.x,
                       &contiguous.h);
    ok = ok && aligned16(p.grad, p, contiguous);
  }
  return ok;
}

cudaError_t attention_cuda(const WindowParams& params, bool backward, cudaStream_t stream) {
  WindowParams p = params;
  p.vec_rows = rows_vectorizable(p, backward);
  if (p.tensor_cores && tensor_cores_cover(p)) return tc_attention_cuda(p, backward, stream);
  return simt_attention_cuda(p, backward, stream);
}

}  // namespace

cudaError_t window_attention_forward_cuda(const WindowParams& p, cudaStream_t stream) {
  return attention_cuda(p, false, stream);
}

cudaError_t window_attention_backward_cuda(const WindowParams& p, cudaStream_t stream) {
  const cudaError_t err = attention_cuda(p, true, stream);
  if (err != cudaSuccess) return err;
  return backward_reductions_cuda(p, stream);
}

}  // namespace window_attention
}  // namespace tokenmix
