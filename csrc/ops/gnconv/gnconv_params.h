// Plain parameter structs and CUDA entry points of HorNet's gnConv. Torch-free: filled by
// gnconv_cuda.cpp, consumed by gnconv_cuda.cu (depthwise parts) and gnconv_gemm_cutlass.cu (the
// gated pws GEMMs). proj_in and proj_out run on the host side as plain GEMMs (ATen, current
// stream).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "tokenmix/dtype.h"
#include "gnconv_math.h"

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

// One step of the pws chain on tensor cores, with the gate applied in the GEMM's epilogue
// (gnconv_gemm_cutlass.cu; CUTLASS, fp16/bf16). All matrices row-major; acc is fp32.
//   kForward  (W is [N, K], acc = A W^T):  t = acc + bias;  z = t * gate
//             z is y_i of the chain; t (z_i before its gate, kept for backward) may be null.
//   kBackward (W is [K, N], acc = A W):    z = acc * gate;  t = scale * acc * pre
//             acc is dL/dy_j, z = dL/dz_j (the next GEMM's input), t = dL/d(dwconv_j) with
//             pre = z_j (or proj_in's first split p0 for j = 0).
enum class GateMode : int { kForward = 0, kBackward = 1 };

struct GatedGemmParams {
  GateMode mode;
  int64_t M, N, K;
  const void* a;
  int64_t lda;
  const void* w;
  int64_t ldw;
  const void* bias;  // [N] or null; kForward only
  const void* gate;
  int64_t ld_gate;
  const void* pre;  // kBackward only
  int64_t ld_pre;
  float scale;
  void* z;
  int64_t ld_z;
  void* t;
  int64_t ld_t;
  DType dtype;
};

// Whether gnconv_gated_gemm_cuda runs this problem: CUTLASS was found at build time, fp16/bf16,
// a device of compute capability >= 8.0, and every operand 16-byte aligned (pointers, leading
// dimensions and N, K in multiples of 8 elements). Otherwise the caller runs the GEMM and the
// gate separately.
bool gnconv_gated_gemm_supported(const GatedGemmParams& p);
cudaError_t gnconv_gated_gemm_cuda(const GatedGemmParams& p, cudaStream_t stream);

cudaError_t gnconv_depthwise_cuda(const DepthwiseParams& p, cudaStream_t stream);
cudaError_t gnconv_depthwise_weight_grad_cuda(const DepthwiseGradParams& p, cudaStream_t stream);

}  // namespace gnconv
}  // namespace tokenmix
