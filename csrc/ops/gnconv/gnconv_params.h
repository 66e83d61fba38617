// Plain parameter structs and CUDA entry points of HorNet's gnConv. Torch-free: filled by
// gnconv.cpp, consumed by gnconv_cuda.cu. The launcher runs the 1x1 projections as GEMMs itself
// (ATen on the current stream); these kernels do the depthwise parts around them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "tokenmix/dtype.h"
#include "tokenmix/gnconv_math.h"

namespace tokenmix {
namespace gnconv {

// dst[pixel, c] = scale * (bias[c] + sum_t w[c, t] src[pixel + o_t, c]) for every pixel of B
// images and c < S (zeros outside the map); with `flip` the kernel is read rotated by 180 degrees
// (the transposed convolution of backward). With gate_out, also the first gate:
// gate_out[pixel, c] = gate_in[pixel, c] * dst[pixel, c] for c < gate_channels.
struct DepthwiseParams {
  const void* src;
  int64_t ld_src;
  const void* weight;  // [k * k, S]: tap-major (Conv2d's [S, 1, k, k] transposed)
  const void* bias;    // [S] or null
  float scale;
  bool flip;
  void* dst;
  int64_t ld_dst;
  const void* gate_in;  // or null
  int64_t ld_gate_in;
  void* gate_out;
  int64_t ld_gate_out, gate_channels;
  DwGeometry geo;
  int64_t B, S;
  DType dtype;
};

// partial[chunk, c, t] = sum over the chunk's pixels p of dy[p, c] * src[p + o_t, c]: the
// depthwise weight gradient in fixed chunks of output rows (dw_chunk_rows over the B * H rows;
// summed by the caller), fp32 (fp64 for fp64).
struct DepthwiseGradParams {
  const void* src;
  int64_t ld_src;
  const void* dy;
  int64_t ld_dy;
  void* partial;  // [chunks, S, k * k]
  int64_t chunks;
  DwGeometry geo;
  int64_t B, S;
  DType dtype;
};

cudaError_t gnconv_depthwise_cuda(const DepthwiseParams& p, cudaStream_t stream);
cudaError_t gnconv_depthwise_weight_grad_cuda(const DepthwiseGradParams& p, cudaStream_t stream);

}  // namespace gnconv
}  // namespace tokenmix
