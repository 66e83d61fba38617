// CUDA kernels of the shifted / rearranged token-mixing family's projections: linear (a 1x1
// projection whose operand is read through a shift or fold map and whose result is stored through
// another map) and weight_grad (its weight and bias gradients). No torch headers: shift_cuda.cpp
// fills the params structs of shift_params.h.
//
// Both are SIMT tiled GEMMs over the pixels n = (b, gy, gx) of the grid, B * GH * GW of them:
// 256 threads (16 x 16) per block, a 64 x 64 output tile, each thread 4 x 4 outputs strided by 16
// (row i of a thread is tile row ty + 16 i, column c is tile column tx + 16 c), so that a warp's
// shared-memory reads are either broadcasts or 16 consecutive words, and its global stores are 16
// consecutive pixels. The reduction dimension advances 16 at a time through shared memory, single
// buffered: simple rather than fast (no tensor cores, no cp.async pipelining).
//
// The mapped operand is loaded element by element through source_offset (shift_math.h), the same
// function the CPU's strided path uses: that load is the shift or the fold, so the shifted or
// folded tensor never exists. Every load and store is bounds-checked, so J, K and the pixel count
// need not be multiples of the tile. Products and sums are in float for half / bfloat16 / float
// and in double for double; weight and bias arrive in that type.
//
// weight_grad's workspace (from the caller) holds chunks x (J K + J) partials; the chunk count is a
// function of J, K and the pixel count only (shift_weight_grad_chunks), so the result's bits do not
// depend on the GPU.
//
// Limits: B * GH * GW < 2^31 * 64 for linear (the block grid's x dimension); J takes as many
// launches as 65535 j tiles (the y dimension's limit) divide it into;
// the operand loads coalesce for NCHW operands (consecutive threads read consecutive pixels) and
// lean on L1 for channels_last ones; a Fold map costs a 64-bit division per operand element (the
// channel of k), which the simple load does not hoist.

#include <algorithm>
#include <cstdint>

#include "shift_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace shift {
namespace {

using namespace cu;

constexpr int kTile = 64;         // output tile rows and columns
constexpr int kStep = 16;         // reduction step through shared memory
constexpr int kSide = 16;         // threads per tile side: kTile / 4
constexpr int kGemmThreads = kSide * kSide;
constexpr int kPad = 1;           // shared rows of kTile + 1: the transposed stores skip banks
constexpr int64_t kMaxTilesX = 2147483647;  // the block grid's limits
constexpr int64_t kMaxTilesY = 65535;

// Weight gradient split: enough chunks that the (J, K) tiles times the chunks fill about
// kTargetBlocks blocks, at most kMaxChunks, each at least kMinChunkPixels pixels. Constants, not
// device properties: the chunks fix the summation order.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkPixels = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pixel n of the grid as (b, gy, gx).
struct Pixel {
  int64_t b, gy, gx;
};

__device__ __forceinline__ Pixel pixel(int64_t n, int64_t GH, int64_t GW) {
  const int64_t hw = GH * GW;
  const int64_t b = n / hw;
  const int64_t r = n - b * hw;
  const int64_t gy = r / GW;
  return {b, gy, r - gy * GW};
}

// Grid element (b, k, gy, gx) read through a map, in the accumulation type; 0 where the map reads
// zero.
template <typename T, typename A>
__device__ __forceinline__ A mapped_load(const T* __restrict__ base, const TokenMap& m,
                                         const Strides4& st, const Pixel& q, int64_t k) {
  const int64_t o = source_offset(m, st, q.b, k, q.gy, q.gx);
  return o < 0 ? A(0) : static_cast<A>(to_acc(base[o]));
}

// ---- linear -----------------------------------------------------------------------------------

// One 64 (j) x 64 (pixels) tile of R = W A (+ bias) per block: blockIdx.x the pixel tile,
// j_tile0 + blockIdx.y the j tile. W^T and A tiles are staged in shared memory as [16 (k)][64]; A
// through in_map, R stored through out_map (dropped where its offset is -1).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) linear_kernel(LinearParams p, int64_t j_tile0) {
  using A = typename AccOf<T>::type;
  __shared__ A ws[kStep][kTile + kPad];
  __shared__ A as[kStep][kTile + kPad];
  const T* __restrict__ src = static_cast<const T*>(p.src);
  const A* __restrict__ weight = static_cast<const A*>(p.weight);
  const A* __restrict__ bias = static_cast<const A*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t N = p.B * p.GH * p.GW;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = (j_tile0 + blockIdx.y) * kTile;

  // Operand loads: this thread's pixel column is fixed for the whole reduction (its coordinates
  // are split once), its rows are lk, lk + 4, ..., lk + 12 of each step.
  const int ln = tid % kTile, lk = tid / kTile;
  const bool n_ok = n0 + ln < N;
  const Pixel q = pixel(n_ok ? n0 + ln : 0, p.GH, p.GW);
  // Weight loads: 16 consecutive k of a row per 16 threads (coalesced), rows wj + 16 i.
  const int wk = tid % kStep, wj = tid / kStep;

  A acc[4][4];
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    TM_UNROLL
    for (int c = 0; c < 4; ++c) acc[i][c] = A(0);
  }

  for (int64_t k0 = 0; k0 < p.K; k0 += kStep) {
    TM_UNROLL
    for (int i = 0; i < kStep / 4; ++i) {
      const int kk = lk + 4 * i;
      const int64_t k = k0 + kk;
      as[kk][ln] = (n_ok && k < p.K) ? mapped_load<T, A>(src, p.in_map, p.src_st, q, k) : A(0);
    }
    TM_UNROLL
    for (int i = 0; i < kTile / kSide; ++i) {
      const int jj = wj + kSide * i;
      const int64_t j = j0 + jj, k = k0 + wk;
      ws[wk][jj] = (j < p.J && k < p.K) ? weight[j * p.K + k] : A(0);
    }
    __syncthreads();
    TM_UNROLL
    for (int s = 0; s < kStep; ++s) {
      A w[4], a[4];
      TM_UNROLL
      for (int i = 0; i < 4; ++i) w[i] = ws[s][ty + kSide * i];
      TM_UNROLL
      for (int c = 0; c < 4; ++c) a[c] = as[s][tx + kSide * c];
      TM_UNROLL
      for (int i = 0; i < 4; ++i) {
        TM_UNROLL
        for (int c = 0; c < 4; ++c) acc[i][c] += w[i] * a[c];
      }
    }
    __syncthreads();
  }

  TM_UNROLL
  for (int c = 0; c < 4; ++c) {
    const int64_t n = n0 + tx + kSide * c;
    if (n >= N) continue;
    const Pixel r = pixel(n, p.GH, p.GW);
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int64_t j = j0 + ty + kSide * i;
      if (j >= p.J) continue;
      const int64_t o = source_offset(p.out_map, p.out_st, r.b, j, r.gy, r.gx);
      if (o < 0) continue;
      const A v = bias != nullptr ? acc[i][c] + bias[j] : acc[i][c];
      out[o] = from_acc<T>(v);
    }
  }
}

// ---- weight_grad ------------------------------------------------------------------------------

// One 64 (j) x 64 (k) tile of one chunk's sum_n G[j, n] A[k, n] per block: blockIdx.x the k tile,
// j_tile0 + blockIdx.y the j tile, blockIdx.z the chunk (pixels [z N / chunks, (z + 1) N /
// chunks)). G and A are staged as [16 (pixels)][64]. The blocks of the first k tile also sum G's
// rows: the bias partial. Sums run over the chunk's pixels in order: no atomics, the same bits on
// every run.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) weight_grad_kernel(WeightGradParams p,
                                                                   int64_t j_tile0) {
  using A = typename AccOf<T>::type;
  __shared__ A gs[kStep][kTile + kPad];
  __shared__ A as[kStep][kTile + kPad];
  const T* __restrict__ grad = static_cast<const T*>(p.grad);
  const T* __restrict__ src = static_cast<const T*>(p.src);
  A* __restrict__ partial = static_cast<A*>(p.partial);

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t N = p.B * p.GH * p.GW;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = (j_tile0 + blockIdx.y) * kTile;
  const int64_t chunk = blockIdx.z;
  const int64_t n_begin = chunk * N / p.chunks, n_end = (chunk + 1) * N / p.chunks;
  const bool bias_block = blockIdx.x == 0;

  // Loads: pixel ln of each step (its coordinates split once per step, shared by its 8 loads),
  // rows lr + 16 i of both G and A.
  const int ln = tid % kStep, lr = tid / kStep;

  A acc[4][4];
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    TM_UNROLL
    for (int c = 0; c < 4; ++c) acc[i][c] = A(0);
  }
  A bsum = A(0);

  for (int64_t nb = n_begin; nb < n_end; nb += kStep) {
    const int64_t n = nb + ln;
    const bool n_ok = n < n_end;
    const Pixel q = pixel(n_ok ? n : 0, p.GH, p.GW);
    TM_UNROLL
    for (int i = 0; i < kTile / kSide; ++i) {
      const int rr = lr + kSide * i;
      const int64_t j = j0 + rr, k = k0 + rr;
      gs[ln][rr] = (n_ok && j < p.J) ? mapped_load<T, A>(grad, p.g_map, p.grad_st, q, j) : A(0);
      as[ln][rr] = (n_ok && k < p.K) ? mapped_load<T, A>(src, p.a_map, p.src_st, q, k) : A(0);
    }
    __syncthreads();
    TM_UNROLL
    for (int s = 0; s < kStep; ++s) {
      A g[4], a[4];
      TM_UNROLL
      for (int i = 0; i < 4; ++i) g[i] = gs[s][ty + kSide * i];
      TM_UNROLL
      for (int c = 0; c < 4; ++c) a[c] = as[s][tx + kSide * c];
      TM_UNROLL
      for (int i = 0; i < 4; ++i) {
        TM_UNROLL
        for (int c = 0; c < 4; ++c) acc[i][c] += g[i] * a[c];
      }
    }
    if (bias_block && tid < kTile) {
      TM_UNROLL
      for (int s = 0; s < kStep; ++s) bsum += gs[s][tid];
    }
    __syncthreads();
  }

  const int64_t JK = p.J * p.K;
  A* part = partial + chunk * (JK + p.J);
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int64_t j = j0 + ty + kSide * i;
    if (j >= p.J) continue;
    TM_UNROLL
    for (int c = 0; c < 4; ++c) {
      const int64_t k = k0 + tx + kSide * c;
      if (k < p.K) part[j * p.K + k] = acc[i][c];
    }
  }
  if (bias_block && tid < kTile && j0 + tid < p.J) part[JK + j0 + tid] = bsum;
}

// grad_weight and grad_bias = the chunks' partials summed in chunk order, one thread per element
// of the [J * K + J] row the partials share.
template <typename A>
__global__ void weight_grad_reduce_kernel(WeightGradParams p) {
  const A* __restrict__ partial = static_cast<const A*>(p.partial);
  A* __restrict__ grad_weight = static_cast<A*>(p.grad_weight);
  A* __restrict__ grad_bias = static_cast<A*>(p.grad_bias);
  const int64_t JK = p.J * p.K, row = JK + p.J;
  for (int64_t t = global_thread(); t < row; t += thread_count()) {
    A s = A(0);
    for (int64_t c = 0; c < p.chunks; ++c) s += partial[c * row + t];
    if (t < JK) {
      grad_weight[t] = s;
    } else {
      grad_bias[t - JK] = s;
    }
  }
}

}  // namespace

int64_t shift_weight_grad_chunks(int64_t J, int64_t K, int64_t N) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(J, kTile)) *
                        std::max<int64_t>(1, ceil_div(K, kTile));
  int64_t chunks = std::min(kMaxChunks, ceil_div(kTargetBlocks, tiles));
  chunks = std::min(chunks, ceil_div(N, kMinChunkPixels));
  return std::max<int64_t>(chunks, 1);
}

cudaError_t shift_linear_cuda(const LinearParams& p, cudaStream_t stream) {
  const int64_t N = p.B * p.GH * p.GW;
  if (N == 0 || p.J == 0) return cudaSuccess;
  const int64_t tiles_x = ceil_div(N, kTile), tiles_y = ceil_div(p.J, kTile);
  if (tiles_x > kMaxTilesX) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // gridDim.y is at most kMaxTilesY: more j tiles than that take several launches.
    for (int64_t jt = 0; jt < tiles_y; jt += kMaxTilesY) {
      const dim3 grid(static_cast<unsigned>(tiles_x),
                      static_cast<unsigned>(std::min(kMaxTilesY, tiles_y - jt)));
      linear_kernel<T><<<grid, kGemmThreads, 0, stream>>>(p, jt);
    }
  });
}

cudaError_t shift_weight_grad_cuda(const WeightGradParams& p, cudaStream_t stream) {
  const int64_t N = p.B * p.GH * p.GW;
  if (N == 0 || p.J == 0) return cudaSuccess;
  const int64_t tiles_y = ceil_div(p.J, kTile);
  if (p.chunks < 1 || p.chunks > kMaxChunks) {
    return cudaErrorInvalidConfiguration;
  }
  const int64_t row = p.J * p.K + p.J;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    // gridDim.y is at most kMaxTilesY: more j tiles than that take several launches.
    for (int64_t jt = 0; jt < tiles_y; jt += kMaxTilesY) {
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(p.K, kTile))),
                      static_cast<unsigned>(std::min(kMaxTilesY, tiles_y - jt)),
                      static_cast<unsigned>(p.chunks));
      weight_grad_kernel<T><<<grid, kGemmThreads, 0, stream>>>(p, jt);
    }
    weight_grad_reduce_kernel<A><<<blocks_for(row, kThreads), kThreads, 0, stream>>>(p);
  });
}

}  // namespace shift
}  // namespace tokenmix
