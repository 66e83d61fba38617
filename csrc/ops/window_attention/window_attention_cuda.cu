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

cudaError_t attention_cuda(const WindowParams& p, bool backward, cudaStream_t stream) {
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
