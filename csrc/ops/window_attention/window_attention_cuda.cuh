// Device helpers shared by the CUDA kernel families of windowed attention
// (window_attention_simt.cu, window_attention_tc.cu, window_attention_reduce.cu) and the entry
// points through which the launchers of window_attention_cuda.cu reach them. Torch-free; included
// only from .cu files.
//
// Every attention kernel runs one block of kWarps warps per (image, window, head), task =
// p.task0 + blockIdx.x = (b * windows + win) * heads + h, and reads window tokens from their
// original map positions (window_attention_math.h: shift, partial border windows).
#pragma once

#include <cstdint>

#include "tokenmix/cuda_common.cuh"
#include "window_attention_params.h"

namespace tokenmix {
namespace window_attention {

constexpr int kWarps = 4;
constexpr int kBlock = kWarps * cu::kWarp;
constexpr int kKeysPerLane = kMaxWindowTokens / cu::kWarp;
constexpr int kChansPerLane = kMaxHeadDim / cu::kWarp;

// Window-local sizes fit in int (tokens <= 256, head_dim <= 128): 32-bit index math in the inner
// loops, 64-bit only where global offsets are formed.
struct Local {
  int T, d, ld, table, rel0, ww;
  __device__ explicit Local(const WindowParams& p)
      : T(static_cast<int>(p.geo.tokens())), d(static_cast<int>(p.d)), ld(static_cast<int>(p.d) + 1),
        table(static_cast<int>(p.geo.table_size())), rel0(relative_offset(p.geo)),
        ww(static_cast<int>(p.geo.ww)) {}
};

// A block's (image, window, head) from its task (b * windows + win) * heads + h: two 64-bit
// divisions, once per block (window_origin's is the only other).
struct Task {
  int64_t task, b, win, h;
  __device__ explicit Task(const WindowParams& p) : task(p.task0 + blockIdx.x) {
    split_task(task, p.heads, p.geo.windows(), &b, &win, &h);
  }
};

// The per-block parts of the row offsets of q, k, v and of the contiguous [B, H, W, heads, d]
// tensors (grad, out, dq, dk, dv): b * stride_b + h * stride_h, to which row_offset
// (window_attention_math.h) adds a token's y * stride_y + x * stride_x.
struct RowBase {
  int64_t q, k, v, map, map_sy, map_sx;
  __device__ RowBase(const WindowParams& p, int64_t b, int64_t h)
      : q(b * p.q_strides.b + h * p.q_strides.h),
        k(b * p.k_strides.b + h * p.k_strides.h),
        v(b * p.v_strides.b + h * p.v_strides.h) {
    int64_t sb = 0, sh = 0;
    contiguous_strides(p.geo, p.heads, p.d, &sb, &map_sy, &map_sx, &sh);
    map = b * sb + h * sh;
  }
};

// Token t of the window whose first token sits at (oy, ox) of the shifted map (window_origin):
// its original row and column (64-bit: a map side may pass 2^31 - 1), Swin region (-1 outside the
// map) and relative position, into the shared arrays; returns whether it lies inside the map.
__device__ __forceinline__ bool place_token(const Geometry& g, int64_t oy, int64_t ox, int t,
                                            int64_t* ty, int64_t* tx, int* treg, int* tpos) {
  int64_t sy = 0, sx = 0;
  const bool exists = shifted_coords_from(g, oy, ox, t, &sy, &sx);
  ty[t] = exists ? original_row(g, sy) : 0;
  tx[t] = exists ? original_col(g, sx) : 0;
  treg[t] = exists ? region(g, sy, sx) : -1;
  tpos[t] = relative_pos(g, t);
  return exists;
}

// place_token's row and column of token t, recomputed (kernels that keep no coordinates in
// shared memory); (0, 0) outside the map.
__device__ __forceinline__ void token_coords(const Geometry& g, int64_t oy, int64_t ox, int t,
                                             int64_t* y, int64_t* x) {
  int64_t sy = 0, sx = 0;
  const bool exists = shifted_coords_from(g, oy, ox, t, &sy, &sx);
  *y = exists ? original_row(g, sy) : 0;
  *x = exists ? original_col(g, sx) : 0;
}

// Row offsets of token t, at original row y and column x (place_token, token_coords), in q, k, v
// and the contiguous grad; q of a global query sits at the token's position in the window. The
// scalar and the 16-byte loads of both kernel families address rows through it.
struct TokenRows {
  int64_t q, k, v, g;
};
__device__ __forceinline__ TokenRows token_rows(const WindowParams& p, const Local& l,
                                                const RowBase& rb, int t, int64_t y, int64_t x) {
  TokenRows r;
  if (p.global_q) {
    const int qy = t / l.ww;
    r.q = row_offset(rb.q, p.q_strides.y, p.q_strides.x, qy, t - qy * l.ww);
  } else {
    r.q = row_offset(rb.q, p.q_strides.y, p.q_strides.x, y, x);
  }
  r.k = row_offset(rb.k, p.k_strides.y, p.k_strides.x, y, x);
  r.v = row_offset(rb.v, p.v_strides.y, p.v_strides.x, y, x);
  r.g = row_offset(rb.map, rb.map_sy, rb.map_sx, y, x);
  return r;
}

// Sets the kernel's dynamic shared memory limit to smem, then launches it with one block per
// (image, window, head). gridDim.x is at most 2^31 - 1: more tasks than that take several
// launches, each told its first task in p.task0.
template <typename Kernel>
cudaError_t launch_per_window(Kernel kernel, const WindowParams& p, int64_t smem,
                              cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  constexpr int64_t kMaxBlocksX = 2147483647;
  const int64_t blocks = p.B * p.geo.windows() * p.heads;
  WindowParams q = p;
  for (q.task0 = 0; q.task0 < blocks; q.task0 += kMaxBlocksX) {
    const int64_t n = blocks - q.task0 < kMaxBlocksX ? blocks - q.task0 : kMaxBlocksX;
    kernel<<<static_cast<unsigned>(n), kBlock, smem, stream>>>(q);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The forward or backward attention kernel of a family: SIMT, for every supported dtype and shape
// (window_attention_simt.cu), or tensor cores, for the problems tensor_cores_cover() accepts
// (window_attention_tc.cu).
cudaError_t simt_attention_cuda(const WindowParams& p, bool backward, cudaStream_t stream);
bool tensor_cores_cover(const WindowParams& p);
cudaError_t tc_attention_cuda(const WindowParams& p, bool backward, cudaStream_t stream);

// After either backward: the bias-table gradient and the global query's dq from the per-block
// partials, in fixed order (window_attention_reduce.cu).
cudaError_t backward_reductions_cuda(const WindowParams& p, cudaStream_t stream);

}  // namespace window_attention
}  // namespace tokenmix
