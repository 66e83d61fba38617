// CUDA kernels of the shifted / rearranged token-mixing family that only move data: gather (a
// grid read through a shift or fold map) and unfold (the fold's inverse, with the padded copies
// added for the fold's adjoint). No torch headers: shift_cuda.cpp fills the params structs of
// shift_params.h. The projections live in shift_gemm.cu.
//
// gather: one thread per grid element (grid-stride loop), the source element found by
//   source_offset (shift_math.h), the function the CPU's strided path uses; 0 where it is -1.
// unfold: one thread per output element, the arithmetic of shift_cpu.cpp's unfold_typed
//   (fold_target, fold_grid_pos, the second padded copy with wrap), the two copies added in the
//   accumulation type.
// Both walk their output in its own memory order (channels fastest for channels_last outputs,
// columns fastest otherwise), so the writes coalesce and, for the usual same-layout source, so do
// the reads. The flat index is split in 32-bit arithmetic when the element count is below 2^31
// (the 64-bit divisions would dominate these memory-bound kernels; below 2^31 the grid-stride
// step cannot wrap an unsigned 32-bit index); the offsets are always 64-bit.
// Limits: none beyond the grid-stride loop's (any size, any strides); a Shift map's dyx must be
// device memory.

#include <climits>
#include <cstdint>

#include "shift_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace shift {
namespace {

using namespace cu;

// The coordinates of flat index t of a [B, C, H, W] walk: w fastest, or c fastest when c_fastest.
struct Coord {
  int64_t b, c, h, w;
};

template <typename I>
__device__ __forceinline__ Coord split(I t, I C, I H, I W, bool c_fastest) {
  I b, c, h, w;
  if (c_fastest) {
    c = t % C;
    t /= C;
    w = t % W;
    t /= W;
    h = t % H;
    b = t / H;
  } else {
    w = t % W;
    t /= W;
    h = t % H;
    t /= H;
    c = t % C;
    b = t / C;
  }
  return {static_cast<int64_t>(b), static_cast<int64_t>(c), static_cast<int64_t>(h),
          static_cast<int64_t>(w)};
}

__device__ __forceinline__ int64_t offset(const Strides4& s, int64_t b, int64_t c, int64_t h,
                                          int64_t w) {
  return b * s.b + c * s.c + h * s.h + w * s.w;
}

template <typename I>
__device__ __forceinline__ I flat_thread() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}

template <typename I>
__device__ __forceinline__ I flat_stride() {
  return static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
}

template <typename T, typename I>
__global__ void gather_kernel(GatherParams p, I total, I K, I GH, I GW, bool c_fastest) {
  using A = typename AccOf<T>::type;
  const T* __restrict__ src = static_cast<const T*>(p.src);
  T* __restrict__ out = static_cast<T*>(p.out);
  const T zero = from_acc<T>(A(0));
  for (I t = flat_thread<I>(); t < total; t += flat_stride<I>()) {
    const Coord q = split<I>(t, K, GH, GW, c_fastest);
    const int64_t o = source_offset(p.map, p.src_st, q.b, q.c, q.h, q.w);
    out[offset(p.out_st, q.b, q.c, q.h, q.w)] = o < 0 ? zero : src[o];
  }
}

template <typename T, typename I>
__global__ void unfold_kernel(UnfoldParams p, I total, I C, I H, I W, bool c_fastest) {
  using A = typename AccOf<T>::type;
  const T* __restrict__ grid = static_cast<const T*>(p.grid);
  T* __restrict__ out = static_cast<T*>(p.out);
  const TokenMap& m = p.map;
  for (I t = flat_thread<I>(); t < total; t += flat_stride<I>()) {
    const Coord q = split<I>(t, C, H, W, c_fastest);
    const int64_t i = m.axis == 2 ? q.h : q.w, other = m.axis == 2 ? q.w : q.h;
    const int64_t pos = fold_target(m, i);
    GridPos g = fold_grid_pos(m, q.c, pos, other);
    A v = to_acc(grid[offset(p.grid_st, q.b, g.k, g.gy, g.gx)]);
    if (m.wrap && pos + m.L < m.Lp) {
      g = fold_grid_pos(m, q.c, pos + m.L, other);
      v += to_acc(grid[offset(p.grid_st, q.b, g.k, g.gy, g.gx)]);
    }
    out[offset(p.out_st, q.b, q.c, q.h, q.w)] = from_acc<T>(v);
  }
}

// Channels fastest where the output's channel stride is the smallest of c and w (channels_last).
bool channels_fastest(const Strides4& s) { return s.c < s.w; }

// One thread per element of the [B, d1, d2, d3] output: launch(dtype tag, index type, blocks,
// channels fastest, total, d1, d2, d3) with 32-bit flat indices where the element count allows.
template <typename Params, typename Launch>
cudaError_t launch_elementwise(const Params& p, int64_t d1, int64_t d2, int64_t d3, Launch launch) {
  const int64_t total = p.B * d1 * d2 * d3;
  if (total == 0) return cudaSuccess;
  const bool cf = channels_fastest(p.out_st);
  const int blocks = blocks_for(total, kThreads);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    if (total <= INT32_MAX) {
      launch(tag, uint32_t{0}, blocks, cf, static_cast<uint32_t>(total), static_cast<uint32_t>(d1),
             static_cast<uint32_t>(d2), static_cast<uint32_t>(d3));
    } else {
      launch(tag, int64_t{0}, blocks, cf, total, d1, d2, d3);
    }
  });
}

}  // namespace

cudaError_t shift_gather_cuda(const GatherParams& p, cudaStream_t stream) {
  return launch_elementwise(p, p.map.K(), p.map.GH(), p.map.GW(),
                            [&](auto tag, auto index, int blocks, bool cf, auto... dims) {
                              using T = decltype(tag);
                              using I = decltype(index);
                              gather_kernel<T, I><<<blocks, kThreads, 0, stream>>>(p, dims..., cf);
                            });
}

cudaError_t shift_unfold_cuda(const UnfoldParams& p, cudaStream_t stream) {
  return launch_elementwise(p, p.map.C, p.map.H, p.map.W,
                            [&](auto tag, auto index, int blocks, bool cf, auto... dims) {
                              using T = decltype(tag);
                              using I = decltype(index);
                              unfold_kernel<T, I><<<blocks, kThreads, 0, stream>>>(p, dims..., cf);
                            });
}

}  // namespace shift
}  // namespace tokenmix
