// Plain parameter structs and CUDA entry points of the sparse-token gather family.
// Torch-free: gather_cuda.cpp fills these from tensors, gather_cuda.cu consumes them.
// Strides and sizes are in elements and 64-bit; every [B, ., C] row has a contiguous channel dim.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "tokenmix/dtype.h"
#include "gather_math.h"

namespace tokenmix {
namespace gather {

// out[b, k, :] = x[b, index[b, k], :]
struct GatherParams {
  const void* x;
  int64_t x_stride_b, x_stride_n;
  const int64_t* index;  // [B, K], contiguous
  void* out;             // [B, K, C], contiguous
  int64_t B, N, K, C;
  DType dtype;
};

// count/first of the inverse map (gather_math.h) of index [B, K] over N positions.
struct InverseParams {
  const int64_t* index;  // [B, K], contiguous
  int32_t* count;        // [B, N], written entirely by the kernel
  int32_t* first;        // [B, N], written entirely by the kernel (kNoEntry where count is 0)
  int64_t B, N, K;
};

// A [B, N, C] result built row by row from the inverse map, as row_source() says.
struct ComposeParams {
  RowMode mode;
  const void* rows;  // [B, K, C], contiguous: grad_out (GatherBackward) or src (Scatter)
  const void* self;  // [B, N, C]: x (Scatter) or grad_out (ScatterBackward); unused otherwise
  int64_t self_stride_b, self_stride_n;
  const int64_t* index;  // [B, K], contiguous
  const int32_t* count;
  const int32_t* first;
  void* out;  // [B, N, C], contiguous
  int64_t B, N, K, C;
  DType dtype;
};

// index[b, :keep_first] = 0..keep_first-1, then the k best of score[b, :M] (ranks_before order),
// shifted by keep_first.
struct TopkParams {
  const void* score;  // [B, M], row stride score_stride_b, unit column stride
  int64_t score_stride_b;
  int64_t* index;  // [B, keep_first + k], contiguous
  int64_t B, M, k, keep_first;
  DType dtype;
};

// policy_softmax over rows of logits [B, H, N, N] (contiguous) with policy [B, N] (contiguous).
// partial: [B, H, ceil(N / kPolicyRowsPerChunk), N] in the accumulation type (float, or double
// for Float64), one policy-gradient partial per chunk of rows, summed in a fixed order afterwards.
struct PolicySoftmaxParams {
  const void* logits;
  const void* policy;
  const void* grad_out;  // backward only, [B, H, N, N] contiguous
  void* out;             // forward: the softmax; backward: grad_logits
  void* grad_policy;     // backward only, [B, N]
  void* partial;         // backward only
  int64_t B, H, N;
  double eps;
  DType dtype;
};

cudaError_t gather_rows_cuda(const GatherParams& p, cudaStream_t stream);
cudaError_t build_inverse_cuda(const InverseParams& p, cudaStream_t stream);
cudaError_t compose_rows_cuda(const ComposeParams& p, cudaStream_t stream);
cudaError_t topk_index_cuda(const TopkParams& p, cudaStream_t stream);
cudaError_t policy_softmax_forward_cuda(const PolicySoftmaxParams& p, cudaStream_t stream);
cudaError_t policy_softmax_backward_cuda(const PolicySoftmaxParams& p, cudaStream_t stream);

}  // namespace gather
}  // namespace tokenmix
