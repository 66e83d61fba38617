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
// The mapped operand is loaded through map_offset (shift_math.h), the split of source_offset (the
// function the CPU's strided path uses) into a per-channel part (map_channel: the channel offset,
// the Shift's (dy, dx) or the Fold's row of the region) and a per-pixel part: that load is the
// shift or the fold, so the shifted or folded tensor never exists. No 64-bit division runs in a
// loop: pixels and channel digits are split once per thread and then advanced by mixed-radix adds
// (advance_pixel, advance_channel), and with 32-bit indices (I = uint32_t, chosen by the host
// where N + 64, J and K + 16 fit below 2^31) those one-off splits are inline 32-bit divisions too.
// Each step computes all of a thread's operand offsets first and then issues its loads back to
// back (4 in linear, 8 in weight_grad) before the first shared store. Every load and store is
// bounds-checked, so J, K and the pixel count need not be multiples of the tile. Products and sums
// are in float for half / bfloat16 / float and in double for double, in the same order as ever;
// weight and bias arrive in that type.
//
// weight_grad's workspace (from the caller) holds chunks x (J K + J) partials; the chunk count is a
// function of J, K and the pixel count only (shift_weight_grad_chunks), so the result's bits do not
// depend on the GPU.
//
// Limits: B * GH * GW < 2^31 * 64 for linear (the block grid's x dimension); J takes as many
// launches as 65535 j tiles (the y dimension's limit) divide it into;
// the operand loads coalesce for NCHW operands (consecutive threads read consecutive pixels) and
// lean on L1 for channels_last ones (16-byte operand loads would need a run of channels sharing
// one shift, which the loader does not look for).

#include <algorithm>
#include <climits>
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

// A 16-byte vector of the accumulation type, for the weight loads.
template <typename A>
struct WVec;
template <>
struct WVec<float> {
  using V = float4;
  static constexpr int kN = 4;
};
template <>
struct WVec<double> {
  using V = double2;
  static constexpr int kN = 2;
};

// ---- linear -----------------------------------------------------------------------------------

// One 64 (j) x 64 (pixels) tile of R = W A (+ bias) per block: blockIdx.x the pixel tile,
// j_tile0 + blockIdx.y the j tile. W^T and A tiles are staged in shared memory as [16 (k)][64]; A
// through in_map, R stored through out_map (dropped where its offset is -1).
// I: uint32_t where the host proved N + 64, J and K + 16 below 2^31, int64_t otherwise. wvec: K a
// multiple of 16 / sizeof(A) and weight 16-byte aligned (checked by the host), so a thread's four
// weight elements of a step are one (float) or two (double) 16-byte loads of consecutive k, which
// never straddle K; else one scalar load each.
// Occupancy (sm_90, 32-bit path): 256 threads x 64 registers = 16384 per block -> 4 blocks; 9.1 KB
// static shared memory (float accumulation; 17.3 KB for double) -> 24; 2048 / 256 -> 8 threads
// limit: 4 blocks, 1024 threads (50%) by registers (double: 80 registers -> 3 blocks, 37.5%;
// the int64 path ~100 registers -> 2 blocks). Bound: the FP32 pipe fed from shared memory, each
// warp spends 8 shared-load wavefronts per 16 FFMA per reduction index (~2:1 against the FMA
// issue rate), about half the SIMT FP32 peak; global traffic per 64 x 64 tile step is 64 x 16
// operand elements + 64 x 16 weights for 64 x 64 x 16 FMAs (32 FLOPs per operand element): not
// memory bound. 16 warps per SM hide the global latency of the single-buffered loads.
template <typename T, typename I>
__global__ void __launch_bounds__(kGemmThreads)
    linear_kernel(LinearParams p, int64_t j_tile0, bool wvec) {
  using A = typename AccOf<T>::type;
  using Vec = WVec<A>;
  constexpr int kVec = Vec::kN;
  constexpr int kWLoads = kTile * kStep / (kGemmThreads * kVec);  // 1 (float), 2 (double)
  __shared__ A ws[kStep][kTile + kPad];
  __shared__ A as[kStep][kTile + kPad];
  const T* __restrict__ src = static_cast<const T*>(p.src);
  const A* __restrict__ weight = static_cast<const A*>(p.weight);
  const A* __restrict__ bias = static_cast<const A*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const I GH = static_cast<I>(p.GH), GW = static_cast<I>(p.GW), K = static_cast<I>(p.K);
  const I N = static_cast<I>(p.B * p.GH * p.GW);
  const I n0 = static_cast<I>(blockIdx.x) * kTile;
  const int64_t j0 = (j_tile0 + blockIdx.y) * kTile;

  // Operand loads: this thread's pixel column is fixed for the whole reduction (split once), its
  // rows are lk, lk + 4, ..., lk + 12 of each step (a warp shares its row: the map's per-channel
  // reads are broadcasts), their channel digits advanced by adds (advance_channel).
  const int ln = tid % kTile, lk = tid / kTile;
  const bool n_ok = n0 + ln < N;
  const PixelOf<I> q = split_pixel<I>(n_ok ? n0 + ln : I(0), GH, GW);
  const int64_t qb = static_cast<int64_t>(q.b) * p.src_st.b;
  const int64_t qy = static_cast<int64_t>(q.gy), qx = static_cast<int64_t>(q.gx);
  const I rp = map_region<I>(p.in_map);
  ChannelDigits<I> kd = split_channel<I>(static_cast<I>(lk), rp);
  const ChannelDigits<I> d4 = split_channel<I>(I(4), rp), d16 = split_channel<I>(I(kStep), rp);
  // Scalar weight loads: 16 consecutive k of a row per 16 threads (coalesced), rows wj + 16 i.
  const int wk = tid % kStep, wj = tid / kStep;

  A acc[4][4];
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    TM_UNROLL
    for (int c = 0; c < 4; ++c) acc[i][c] = A(0);
  }

  for (I k0 = 0; k0 < K; k0 += kStep) {
    // Offsets first (-1: reads zero), then the step's loads (operand and weight) back to back,
    // all before the first shared store.
    int64_t ao[kStep / 4];
    ChannelDigits<I> d = kd;
    TM_UNROLL
    for (int i = 0; i < kStep / 4; ++i) {
      const I k = k0 + lk + 4 * i;
      if (i > 0) advance_channel<I>(d, d4, rp);
      ao[i] = -1;
      if (n_ok && k < K) {
        const MapChannel ch = map_channel_of<I>(p.in_map, p.src_st, d);
        ao[i] = map_offset(p.in_map, p.src_st, ch, qb, qy, qx);
      }
    }
    A av[kStep / 4];
    TM_UNROLL
    for (int i = 0; i < kStep / 4; ++i) {
      av[i] = ao[i] < 0 ? A(0) : static_cast<A>(to_acc(src[ao[i]]));
    }
    advance_channel<I>(kd, d16, rp);
    if (wvec) {
      union {
        typename Vec::V v;
        A a[kVec];
      } wv[kWLoads];
      TM_UNROLL
      for (int v = 0; v < kWLoads; ++v) {
        const int e = (tid + kGemmThreads * v) * kVec;
        const int64_t j = j0 + e / kStep;
        const I k = k0 + e % kStep;
        if (j < p.J && k < K) {
          wv[v].v = *reinterpret_cast<const typename Vec::V*>(weight + j * p.K + k);
        } else {
          TM_UNROLL
          for (int x = 0; x < kVec; ++x) wv[v].a[x] = A(0);
        }
      }
      TM_UNROLL
      for (int i = 0; i < kStep / 4; ++i) as[lk + 4 * i][ln] = av[i];
      TM_UNROLL
      for (int v = 0; v < kWLoads; ++v) {
        const int e = (tid + kGemmThreads * v) * kVec;
        TM_UNROLL
        for (int x = 0; x < kVec; ++x) ws[e % kStep + x][e / kStep] = wv[v].a[x];
      }
    } else {
      A wv[kTile / kSide];
      TM_UNROLL
      for (int i = 0; i < kTile / kSide; ++i) {
        const int64_t j = j0 + wj + kSide * i;
        const I k = k0 + wk;
        wv[i] = (j < p.J && k < K) ? weight[j * p.K + k] : A(0);
      }
      TM_UNROLL
      for (int i = 0; i < kStep / 4; ++i) as[lk + 4 * i][ln] = av[i];
      TM_UNROLL
      for (int i = 0; i < kTile / kSide; ++i) ws[wk][wj + kSide * i] = wv[i];
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

  // Store: the first pixel and row split once, the others 16 further each (advance_pixel,
  // advance_channel).
  const I op = map_region<I>(p.out_map);
  const ChannelDigits<I> o16 = split_channel<I>(I(kSide), op);
  const PixelOf<I> n16 = split_pixel<I>(I(kSide), GH, GW);
  PixelOf<I> r[4];
  r[0] = split_pixel<I>(n0 + tx, GH, GW);
  TM_UNROLL
  for (int c = 1; c < 4; ++c) {
    r[c] = r[c - 1];
    advance_pixel<I>(r[c], n16, GH, GW);
  }
  ChannelDigits<I> jd = split_channel<I>(static_cast<I>(j0 + ty), op);
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    if (i > 0) advance_channel<I>(jd, o16, op);
    const int64_t j = j0 + ty + kSide * i;
    if (j >= p.J) continue;
    const MapChannel ch = map_channel_of<I>(p.out_map, p.out_st, jd);
    const bool has_bias = bias != nullptr;
    const A bj = has_bias ? bias[j] : A(0);
    TM_UNROLL
    for (int c = 0; c < 4; ++c) {
      if (n0 + tx + kSide * c >= N) continue;
      const int64_t o =
          map_offset(p.out_map, p.out_st, ch, static_cast<int64_t>(r[c].b) * p.out_st.b,
                     static_cast<int64_t>(r[c].gy), static_cast<int64_t>(r[c].gx));
      if (o < 0) continue;
      const A v = has_bias ? acc[i][c] + bj : acc[i][c];
      out[o] = from_acc<T>(v);
    }
  }
}

// ---- weight_grad ------------------------------------------------------------------------------

// Pixel range of each chunk, [begin[z], begin[z + 1]): computed on the host (z N / chunks).
struct ChunkBounds {
  int64_t begin[kMaxChunks + 1];
};

// One 64 (j) x 64 (k) tile of one chunk's sum_n G[j, n] A[k, n] per block: blockIdx.x the k tile,
// j_tile0 + blockIdx.y the j tile, blockIdx.z the chunk. G and A are staged as [16 (pixels)][64].
// The blocks of the first k tile also sum G's rows: the bias partial. Sums run over the chunk's
// pixels in order: no atomics, the same bits on every run.
// The tile's 64 + 64 channels are decomposed once per block into shared memory (map_channel: a
// warp reads two entries, broadcasts); each thread's pixel is split once and then advanced 16
// pixels per step by a mixed-radix add; the chunk bounds come from the host (no division).
// I: uint32_t where the host proved N + 16, J and K below 2^31, int64_t otherwise.
// Occupancy (sm_90, 32-bit path): 256 threads x 64 registers -> 4 blocks; 12.1 KB static shared
// memory (operand tiles 8.3 KB + channel tables 3 KB; 20.3 KB for double) -> 18; 4 blocks,
// 1024 threads (50%) by registers (double: 80 registers -> 3 blocks; int64 path 80 / 118).
// Bound: as linear, shared-memory wavefronts feeding the FP32 pipe; 8 mapped loads per thread per
// step (2 x 64 x 16 elements per 64 x 64 x 16 FMAs) are in flight together.
template <typename T, typename I>
__global__ void __launch_bounds__(kGemmThreads)
    weight_grad_kernel(WeightGradParams p, int64_t j_tile0, ChunkBounds bounds) {
  using A = typename AccOf<T>::type;
  __shared__ A gs[kStep][kTile + kPad];
  __shared__ A as[kStep][kTile + kPad];
  __shared__ MapChannel gch[kTile], ach[kTile];
  const T* __restrict__ grad = static_cast<const T*>(p.grad);
  const T* __restrict__ src = static_cast<const T*>(p.src);
  A* __restrict__ partial = static_cast<A*>(p.partial);

  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = (j_tile0 + blockIdx.y) * kTile;
  const int64_t chunk = blockIdx.z;
  const I n_begin = static_cast<I>(bounds.begin[chunk]);
  const I n_end = static_cast<I>(bounds.begin[chunk + 1]);
  const bool bias_block = blockIdx.x == 0;
  const I GH = static_cast<I>(p.GH), GW = static_cast<I>(p.GW);

  if (tid < kTile) {
    if (j0 + tid < p.J) gch[tid] = map_channel<I>(p.g_map, p.grad_st, static_cast<I>(j0 + tid));
  } else if (tid < 2 * kTile) {
    const int64_t k = k0 + tid - kTile;
    if (k < p.K) ach[tid - kTile] = map_channel<I>(p.a_map, p.src_st, static_cast<I>(k));
  }

  // Loads: pixel ln of each step, rows lr + 16 i of both G and A.
  const int ln = tid % kStep, lr = tid / kStep;
  PixelOf<I> q = split_pixel<I>(n_begin + ln, GH, GW);
  const PixelOf<I> step = split_pixel<I>(I(kStep), GH, GW);

  A acc[4][4];
  TM_UNROLL
  for (int i = 0; i < 4; ++i) {
    TM_UNROLL
    for (int c = 0; c < 4; ++c) acc[i][c] = A(0);
  }
  A bsum = A(0);
  __syncthreads();

  for (I nb = n_begin; nb < n_end; nb += kStep) {
    const bool n_ok = nb + ln < n_end;
    const int64_t gb = static_cast<int64_t>(q.b) * p.grad_st.b;
    const int64_t ab = static_cast<int64_t>(q.b) * p.src_st.b;
    const int64_t qy = static_cast<int64_t>(q.gy), qx = static_cast<int64_t>(q.gx);
    // Offsets first (-1: reads zero), then all eight loads back to back.
    int64_t go[kTile / kSide], ao[kTile / kSide];
    TM_UNROLL
    for (int i = 0; i < kTile / kSide; ++i) {
      const int rr = lr + kSide * i;
      go[i] = (n_ok && j0 + rr < p.J) ? map_offset(p.g_map, p.grad_st, gch[rr], gb, qy, qx) : -1;
      ao[i] = (n_ok && k0 + rr < p.K) ? map_offset(p.a_map, p.src_st, ach[rr], ab, qy, qx) : -1;
    }
    A gv[kTile / kSide], av[kTile / kSide];
    TM_UNROLL
    for (int i = 0; i < kTile / kSide; ++i) {
      gv[i] = go[i] < 0 ? A(0) : static_cast<A>(to_acc(grad[go[i]]));
      av[i] = ao[i] < 0 ? A(0) : static_cast<A>(to_acc(src[ao[i]]));
    }
    TM_UNROLL
    for (int i = 0; i < kTile / kSide; ++i) {
      gs[ln][lr + kSide * i] = gv[i];
      as[ln][lr + kSide * i] = av[i];
    }
    advance_pixel<I>(q, step, GH, GW);
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
  // 32-bit indices: every pixel index (up to N + kTile), channel (J, K + kStep, the maps' K) and
  // quotient fits.
  const bool i32 = N + kTile <= INT32_MAX && p.J <= INT32_MAX && p.K + kStep <= INT32_MAX &&
                   p.in_map.K() <= INT32_MAX && p.out_map.K() <= INT32_MAX;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const bool wvec = p.K % WVec<A>::kN == 0 && reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
    // gridDim.y is at most kMaxTilesY: more j tiles than that take several launches.
    for (int64_t jt = 0; jt < tiles_y; jt += kMaxTilesY) {
      const dim3 grid(static_cast<unsigned>(tiles_x),
                      static_cast<unsigned>(std::min(kMaxTilesY, tiles_y - jt)));
      if (i32) {
        linear_kernel<T, uint32_t><<<grid, kGemmThreads, 0, stream>>>(p, jt, wvec);
      } else {
        linear_kernel<T, int64_t><<<grid, kGemmThreads, 0, stream>>>(p, jt, wvec);
      }
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
  ChunkBounds bounds{};
  for (int64_t z = 0; z <= p.chunks; ++z) bounds.begin[z] = z * N / p.chunks;
  const bool i32 = N + kStep <= INT32_MAX && p.J <= INT32_MAX && p.K <= INT32_MAX &&
                   p.g_map.K() <= INT32_MAX && p.a_map.K() <= INT32_MAX;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    // gridDim.y is at most kMaxTilesY: more j tiles than that take several launches.
    for (int64_t jt = 0; jt < tiles_y; jt += kMaxTilesY) {
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(p.K, kTile))),
                      static_cast<unsigned>(std::min(kMaxTilesY, tiles_y - jt)),
                      static_cast<unsigned>(p.chunks));
      if (i32) {
        weight_grad_kernel<T, uint32_t><<<grid, kGemmThreads, 0, stream>>>(p, jt, bounds);
      } else {
        weight_grad_kernel<T, int64_t><<<grid, kGemmThreads, 0, stream>>>(p, jt, bounds);
      }
    }
    weight_grad_reduce_kernel<A><<<blocks_for(row, kThreads), kThreads, 0, stream>>>(p);
  });
}

}  // namespace shift
}  // namespace tokenmix
