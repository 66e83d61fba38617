// Plain parameter struct and CUDA entry points of deformable convolution. Torch-free: filled by
// deform_conv2d_cuda.cpp, consumed by deform_conv2d_cuda.cu. fp16/bf16 forwards run as one fused
// kernel; otherwise the host side runs the channel-mixing GEMMs itself (ATen on the current
// stream) and these kernels do the sampling around them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "deform_conv2d_math.h"
#include "tokenmix/dtype.h"

namespace tokenmix {
namespace deform_conv2d {

struct DeformParams {
  const void* input;   // [B, Cin, H, W] contiguous
  const void* offset;  // [B, 2 G kk, Ho, Wo] contiguous
  const void* mask;    // [B, G kk, Ho, Wo] contiguous, or null
  Geometry geo;
  int64_t b0, nb;      // the chunk of images [b0, b0 + nb) this launch covers
  int64_t Cin, G;      // input channels, offset groups
  DType dtype;

  void* cols;             // [nb, Cin * kk, Ho * Wo] in the input dtype, row c * kk + tap
  const void* grad_cols;  // backward: like cols
  void* grad_input;       // backward: [B, Cin, H, W] in the accumulation type, zeroed
  void* grad_offset;      // backward: like offset
  void* grad_mask;        // backward: like mask, or null

  // Fused forward (ImplicitGemm in deform_conv2d_math.h) over images [b0, b0 + nb):
  const void* weight_tk;  // [Cout, kk * Cin], tap-major columns
  const void* bias;       // [Cout] or null
  void* out;              // [B, Cout, Ho, Wo] contiguous
  int64_t Cout;
};

// cols = bilinear samples (times the mask) of every (channel, tap, output pixel) of the chunk.
cudaError_t deform_im2col_cuda(const DeformParams& p, cudaStream_t stream);
// grad_input += grad_cols scattered back to each sample's four neighbours (atomic adds).
cudaError_t deform_col2im_cuda(const DeformParams& p, cudaStream_t stream);
// grad_offset and grad_mask of the chunk, one thread per (offset group, tap, pixel).
cudaError_t deform_col2im_coord_cuda(const DeformParams& p, cudaStream_t stream);
// The whole forward in one kernel, sampling straight into tensor-core tiles: no column buffer.
// fp16/bf16 on devices of compute capability >= 8.0 with one weight group and a block grid the
// device can launch (see the predicate).
bool deform_forward_fused_supported(const DeformParams& p, int64_t weight_groups);
cudaError_t deform_forward_fused_cuda(const DeformParams& p, cudaStream_t stream);

}  // namespace deform_conv2d
}  // namespace tokenmix
