// Plain parameter structs and CUDA entry points of the shifted / rearranged token-mixing family.
// Torch-free: shift_cuda.cpp fills these from tensors, shift_cuda.cu (gather, unfold) and
// shift_gemm.cu (linear, weight_grad) consume them. Sizes and strides are in elements and 64-bit;
// every tensor is [B, C, H, W] with any strides (Strides4), read and written through source_offset
// (shift_math.h), so the CUDA kernels share their index math with the CPU ones. A TokenMap's dyx
// table (Shift maps) is device memory.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "shift_math.h"
#include "tokenmix/dtype.h"

namespace tokenmix {
namespace shift {

// out[b, k, gy, gx] = src[source_offset(map, src_st, b, k, gy, gx)], 0 where that is -1.
struct GatherParams {
  const void* src;  // the map's source [B, map.C, map.H, map.W]
  Strides4 src_st;
  TokenMap map;
  void* out;  // the grid [B, map.K(), map.GH(), map.GW()]
  Strides4 out_st;
  int64_t B;
  DType dtype;  // of src and out
};

// The inverse of a fold map: out[b, c, h, w] = grid element at padded position fold_target(i) of
// the folded axis, plus its padded copy at fold_target(i) + L when map.wrap and that is < Lp.
struct UnfoldParams {
  const void* grid;  // [B, map.K(), map.GH(), map.GW()]
  Strides4 grid_st;
  TokenMap map;  // kind == Fold
  void* out;     // [B, map.C, map.H, map.W], every element written
  Strides4 out_st;
  int64_t B;
  DType dtype;  // of grid and out
};

// R[b, j, gy, gx] = bias[j] + sum_k weight[j, k] A[b, k, gy, gx], A the grid of src through
// in_map; R stored at out[source_offset(out_map, out_st, b, j, gy, gx)], skipped where -1.
struct LinearParams {
  const void* src;  // in_map's source
  Strides4 src_st;
  TokenMap in_map;
  const void* weight;  // [J, K] contiguous, in the accumulation type (float, double for Float64)
  const void* bias;    // [J] in the accumulation type, or nullptr
  void* out;           // out_map's source
  Strides4 out_st;
  TokenMap out_map;  // its grid is [B, J, GH, GW]
  int64_t B, J, K;   // K = in_map.K()
  int64_t GH, GW;    // in_map's grid
  DType dtype;       // of src and out
};

// grad_weight[j, k] = sum_n G[j, n] A[k, n], grad_bias[j] = sum_n G[j, n], n over the B * GH * GW
// pixels of the grid; G read from grad through g_map, A from src through a_map. The pixels are
// split into `chunks` fixed ranges (shift_weight_grad_chunks, a function of the sizes only); each
// chunk's sums go to partial, which a second kernel adds up in chunk order.
struct WeightGradParams {
  const void* grad;  // g_map's source
  Strides4 grad_st;
  TokenMap g_map;  // grid [B, J, GH, GW]
  const void* src;  // a_map's source
  Strides4 src_st;
  TokenMap a_map;     // grid [B, K, GH, GW]
  void* grad_weight;  // [J, K] contiguous, accumulation type; overwritten
  void* grad_bias;    // [J] accumulation type; overwritten
  void* partial;      // [chunks, J * K + J] accumulation type, contiguous; scratch
  int64_t chunks;
  int64_t B, J, K, GH, GW;
  DType dtype;  // of grad and src
};

// Number of pixel chunks the weight gradient of these sizes is split into: depends on the sizes
// only, never on the device, so the summation order (and the result's bits) is fixed.
int64_t shift_weight_grad_chunks(int64_t J, int64_t K, int64_t N);

cudaError_t shift_gather_cuda(const GatherParams& p, cudaStream_t stream);
cudaError_t shift_unfold_cuda(const UnfoldParams& p, cudaStream_t stream);
cudaError_t shift_linear_cuda(const LinearParams& p, cudaStream_t stream);
cudaError_t shift_weight_grad_cuda(const WeightGradParams& p, cudaStream_t stream);

}  // namespace shift
}  // namespace tokenmix
