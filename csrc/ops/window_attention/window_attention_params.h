// Plain parameter struct and CUDA entry points of windowed attention. Torch-free: filled by
// window_attention_cuda.cpp, consumed by the kernels of window_attention_*.cu. Sizes and strides
// in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "tokenmix/dtype.h"
#include "tokenmix/macros.h"
#include "window_attention_math.h"

namespace tokenmix {
namespace window_attention {

// Strides of dims 0-3 of a [B, H, W, heads, d] (or [B, wh, ww, heads, d]) tensor; dim 4 has 1.
struct Strides4 {
  int64_t b, y, x, h;
};

struct WindowParams {
  const void* q;  // [B, H, W, heads, d], or [B, wh, ww, heads, d] when global_q
  const void* k;
  const void* v;
  const void* bias_table;  // [(2wh-1)(2ww-1), heads] contiguous, or null
  Strides4 q_strides, k_strides, v_strides;
  Geometry geo;
  int64_t B, heads, d;
  double scale;
  bool global_q;
  DType dtype;
  bool tensor_cores;  // the tensor-core kernels where they apply (fp16/bf16, d 32, <= 64 tokens)
  int64_t task0;      // the first (image, window, head) task of a launch (launch_per_window)
  // The rows of q, k, v (and grad in backward) start on 16-byte boundaries (rows_aligned16):
  // the kernels then read them 16 bytes at a time. Set by window_attention_{forward,backward}_cuda.
  bool vec_rows;

  void* out;  // forward: [B, H, W, heads, d] contiguous
  void* lse;  // [B, windows, tokens, heads], float (double for Float64); forward: may be null

  const void* grad;  // backward: contiguous like out
  void* dq;          // contiguous like q
  void* dk;          // contiguous like k
  void* dv;
  void* dbias;          // [(2wh-1)(2ww-1), heads]
  void* dbias_partial;  // [B * windows * heads, table], accumulation type
  void* dbias_chunks;   // [dbias_chunk_count(B * windows), heads, table], accumulation type
  void* dq_partial;     // [B, windows, tokens, heads, d], accumulation type (global_q)
};

// The bias-table gradient is reduced in two fixed-order levels: sums of kDbiasChunk consecutive
// (image, window) blocks, then the sum of those in chunk order. One level would leave a few
// hundred threads each reading thousands of partials one after another.
constexpr int64_t kDbiasChunk = 64;
TM_HOST_DEVICE int64_t dbias_chunk_count(int64_t blocks) {
  return (blocks + kDbiasChunk - 1) / kDbiasChunk;
}

// Largest window (tokens) and head_dim the kernels take: one warp lane holds up to 8 keys and
// 4 channels of a row.
constexpr int64_t kMaxWindowTokens = 256;
constexpr int64_t kMaxHeadDim = 128;

// Dynamic shared memory one block needs; the launcher compares it with the device's opt-in limit.
int64_t window_attention_smem_bytes(const WindowParams& p, bool backward);

cudaError_t window_attention_forward_cuda(const WindowParams& p, cudaStream_t stream);
cudaError_t window_attention_backward_cuda(const WindowParams& p, cudaStream_t stream);

}  // namespace window_attention
}  // namespace tokenmix
