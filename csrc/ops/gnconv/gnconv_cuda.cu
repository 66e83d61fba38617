// CUDA kernels of HorNet's gnConv: the depthwise convolution (fused with its bias, the scale and
// the first gate p0 * g_0) and its weight gradient. The 1x1 projections and the later gates run in
// the launcher (cuBLAS through ATen, or the CUTLASS gated GEMM). Tap geometry, strip blocking and
// work-item numbering are gnconv_math.h, shared with the CPU kernels and with the host-side
// emulation the tests run (tests/cpp/gnconv_strip_emulation.cpp).
//
// depthwise, K in {3, 5, 7}: one thread per strip of R outputs along a row of V channels, channel
//   groups fastest, so rows of the channels-last operands are read and written coalesced; each
//   loaded input feeds up to K taps from registers. V is a 16-byte vector when the launcher finds
//   every operand aligned for it, else 1. Weights are tap-major ([k * k, S]) so they load as
//   vectors too. Other kernel sizes (or more than 2^31 work items): one thread per (pixel, channel).
// weight grad, K in {3, 5, 7}: one thread per (row chunk, kernel row, V channels) sums its chunk's
//   rows strip by strip into K x V registers and writes its own partial, so the result is
//   deterministic. Other kernel sizes: a block (32 channels x 8 pixel lanes) per (channel block,
//   tap, row chunk), the lanes summed in shared memory in a fixed order.
// Occupancy figures below are for sm_90 (65536 registers, 2048 threads, 32 blocks, 228 KB shared
// memory per SM; ~67 TFLOP/s FP32 FMA against 3.35 TB/s HBM on an H100 SXM, ~20 FLOP/B) with the
// register counts ptxas reports for nvcc 13.0.

#include <cstdint>

#include "gnconv_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace gnconv {
namespace {

using namespace cu;

// Depthwise conv for any kernel size: one thread per (pixel, channel), channels fastest; taps
// clipped to the map, summed ky-major like the strip kernels. The fallback for k outside {3, 5, 7}
// and for problems past 32-bit item numbering; 64-bit index decomposition once per item.
// Occupancy: 256 threads/block, 56 registers -> 4 blocks/SM (65536 / (56 * 256) = 4.6), 32 warps,
// no shared memory. Bound: load-issue (two scalar loads per FMA, weights and inputs via L1).
template <typename T>
__global__ void depthwise_kernel(DepthwiseParams p) {
  using A = typename AccOf<T>::type;
  const DwGeometry& g = p.geo;
  const int64_t HW = g.H * g.W, taps = g.taps(), pad = g.pad();
  const int64_t total = p.B * HW * p.S;
  const T* src = static_cast<const T*>(p.src);
  const T* w = static_cast<const T*>(p.weight);
  for (int64_t i = global_thread(); i < total; i += thread_count()) {
    const int64_t c = i % p.S, pix = i / p.S;
    const int64_t b = pix / HW, y = (pix % HW) / g.W, x = pix % g.W;
    A acc = p.bias != nullptr ? to_acc(static_cast<const T*>(p.bias)[c]) : A(0);
    for (int64_t ky = g.tap_lo(y); ky < g.tap_hi(y, g.H); ++ky) {
      for (int64_t kx = g.tap_lo(x); kx < g.tap_hi(x, g.W); ++kx) {
        const int64_t t = ky * g.k + kx;
        const int64_t q = (b * g.H + y + ky - pad) * g.W + x + kx - pad;
        acc += to_acc(w[(p.flip ? taps - 1 - t : t) * p.S + c]) * to_acc(src[q * p.ld_src + c]);
      }
    }
    const T out = from_acc<T>(acc * static_cast<A>(p.scale));
    static_cast<T*>(p.dst)[pix * p.ld_dst + c] = out;
    if (p.gate_out != nullptr && c < p.gate_channels) {
      const A gin = to_acc(static_cast<const T*>(p.gate_in)[pix * p.ld_gate_in + c]);
      static_cast<T*>(p.gate_out)[pix * p.ld_gate_out + c] = from_acc<T>(gin * to_acc(out));
    }
  }
}

constexpr int kStrip = 8;

// V consecutive elements of one pixel's channel row, loaded as one access of V * sizeof(T) bytes
// (16 for the vector path: LDG.E.128) through the read-only path: none of these kernels writes a
// buffer it reads.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T e[V];
};

template <int Bytes> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<2> { using type = unsigned short; };

template <typename T, int V>
using RawPack = typename RawOf<static_cast<int>(sizeof(T)) * V>::type;

template <int V, typename T>
__device__ __forceinline__ RawPack<T, V> fetch(const T* p) {
  return __ldg(reinterpret_cast<const RawPack<T, V>*>(p));
}

template <typename T, int V, typename A>
__device__ __forceinline__ void widen(const RawPack<T, V>& raw, A (&vals)[V]) {
  Pack<T, V> pk;
  memcpy(&pk, &raw, sizeof(raw));
  TM_UNROLL
  for (int v = 0; v < V; ++v) vals[v] = to_acc(pk.e[v]);
}

template <int V, typename T, typename A>
__device__ __forceinline__ void load_acc(const T* p, A (&vals)[V]) {
  widen<T, V>(fetch<V>(p), vals);
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store_acc(T* p, const A (&vals)[V]) {
  Pack<T, V> pk;
  TM_UNROLL
  for (int v = 0; v < V; ++v) pk.e[v] = from_acc<T>(vals[v]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Channels per vector and outputs per strip of the vector kernels: the largest that ptxas (sm_90
// and sm_80, -Xptxas -v) fits in the 128 registers of two blocks per multiprocessor with no spill
// (bf16 K = 7 forward uses all 128). Forward: R * V accumulators, R + K - 1 input and K weight packs per
// kernel row; 16-byte packs (fp16/bf16 R = 4; fp32 R = 8, 6 for K = 7; fp64 R = 4).
// Weight gradient: K * V partial sums, R dy and R + K - 1 input packs per strip. L1 bytes per FMA
// fall with R (2 (2R + K - 1) / (R K) for 2-byte types) and not with V, and 16-byte fp16 packs
// leave no room for R > 4 beside K = 7's 56 sums (R = 4 already spills), so fp16/bf16 use 8-byte
// packs with R = 8; fp32 and fp64 16-byte packs with R = 4.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));
template <typename T, int K>
constexpr int kVecStrip = sizeof(T) == 4 ? (K == 7 ? 6 : 8) : 4;
template <typename T>
constexpr int kGradVec = sizeof(T) == 2 ? 4 : kVec<T>;
template <typename T>
constexpr int kGradStrip = sizeof(T) == 2 ? 8 : 4;
// Channel groups per block of dw_vec_grad_item: 8 packs (64 or 128 bytes) of each input row, or
// 32 channels for the scalar kernel.
template <int V>
constexpr int kGradGroups = V == 1 ? 32 : 8;

// Strip-blocked depthwise conv, K in {3, 5, 7}: one thread per work item of R outputs along a row x
// V channels (gnconv_math.h, depthwise_vec_item); fuses bias, scale and the first gate. Vector
// path: V = 16 / sizeof(T) channels per 16-byte load (LDG.E.128), R = kVecStrip; scalar path
// (channel count, row strides, gate width or a pointer not 16-byte aligned): V = 1, R = kStrip.
// Per kernel row a thread issues R + K - 1 input and K weight loads, all independent and in flight
// together (raw packs first, widening to fp32 after), then R * K * V FMAs into R * V fp32
// accumulators in the fixed order bias, ky, kx. Items and B * H are 32-bit (the launcher checks).
// Occupancy, vector path: 256 threads/block, launch bound 2 blocks/SM -> <= 128 registers/thread
// (65536 / (2 * 256)); ptxas: fp16/bf16 101-128, fp32 104-120, fp64 72-104; no shared memory ->
// 2 blocks, 16 warps/SM. That is enough: for fp16 K = 7 (R = 4) each thread has 17 x 16 B in
// flight per kernel row, 139 KB/SM, against the ~26 KB/SM that 3.35 TB/s x ~1 us needs, and its
// 32 independent accumulators cover FMA latency. Scalar path: launch bound 3 blocks (2 for fp64)
// -> <= 80 registers (85, allocated in steps of 8), ptxas 60-80 -> 3 blocks, 24 warps/SM.
// Bound: per output and channel, 2 K^2 FLOP (98 for K = 7) against 4 B (fp16: read the input once,
// write the output) to 8 B (gated channels) of HBM traffic, ~12-25 FLOP/B: at the FP32/HBM balance
// of ~20, with (R + 2K - 1) / (R K) = 0.6 fp16->fp32 conversions per FMA on top for K = 7, so the
// FP32 pipe is the limit for fp16/bf16 and HBM for fp32.
template <typename T, int K, int V, int R, int MinBlocks>
__global__ void __launch_bounds__(kThreads, MinBlocks) depthwise_strip_kernel(DepthwiseParams p) {
  using A = typename AccOf<T>::type;
  const DwGeometry& g = p.geo;
  const uint32_t groups = static_cast<uint32_t>(p.S / V);
  const uint32_t total = static_cast<uint32_t>(p.B * g.H * dw_strips_per_row<R>(g) * groups);
  const int taps = K * K;
  const T* src = static_cast<const T*>(p.src);
  const T* w = static_cast<const T*>(p.weight);
  const T* bias_p = static_cast<const T*>(p.bias);
  T* dst = static_cast<T*>(p.dst);
  const T* gate_in = static_cast<const T*>(p.gate_in);
  T* gate_out = static_cast<T*>(p.gate_out);
  const A scale = static_cast<A>(p.scale);
  const uint32_t stride = static_cast<uint32_t>(thread_count());
  for (uint32_t item = static_cast<uint32_t>(global_thread()); item < total; item += stride) {
    const DwStrip s = dw_vec_strip<R>(g, groups, V, item);
    const int64_t c = s.c;
    const bool gate = gate_out != nullptr && c < p.gate_channels;
    A bias[V];
    if (bias_p != nullptr) {
      load_acc<V>(bias_p + c, bias);
    } else {
      TM_UNROLL
      for (int v = 0; v < V; ++v) bias[v] = A(0);
    }
    depthwise_vec_item<K, R, V>(
        g, s, bias,
        [&](int64_t row, int64_t sx) { return fetch<V>(src + (row * g.W + sx) * p.ld_src + c); },
        [&](int t) { return fetch<V>(w + (p.flip ? taps - 1 - t : t) * p.S + c); },
        [&](const RawPack<T, V>& raw, A(&vals)[V]) { widen<T, V>(raw, vals); },
        [&](int64_t pix, const A(&acc)[V]) {
          A out[V];
          TM_UNROLL
          for (int v = 0; v < V; ++v) out[v] = to_acc(from_acc<T>(acc[v] * scale));
          store_acc<V>(dst + pix * p.ld_dst + c, out);
          if (gate) {
            A gin[V];
            load_acc<V>(gate_in + pix * p.ld_gate_in + c, gin);
            TM_UNROLL
            for (int v = 0; v < V; ++v) gin[v] *= out[v];
            store_acc<V>(gate_out + pix * p.ld_gate_out + c, gin);
          }
        });
  }
}

// Weight gradient, K in {3, 5, 7}: one thread per (row chunk, kernel row ky, V channels)
// (gnconv_math.h, depthwise_vec_grad_item): it sums its chunk's rows, x ascending, into K x V fp32
// registers and writes its own partial, so the result is deterministic and the same as with V = 1.
// Items are numbered (chunk, block of G channel groups, ky, group), so a warp covers 32 / G kernel
// rows of G neighbouring groups: the loads of each input row are G * V contiguous channels (whole
// sectors), and the dy vectors, which every kernel row of a group needs, are fetched once per warp
// instruction for all of the warp's kernel rows instead of once per row by threads in different
// blocks. (One thread holding all K * K taps of a 16-byte fp16 group would need 392 accumulators.)
// Vector path V = kGradVec (8 bytes for fp16/bf16, 16 for fp32/fp64), R = kGradStrip; scalar
// path V = 1, R = kStrip, G = 32. Image rows advance by counters: no division in the row loop.
// Occupancy: 256 threads/block, launch bound 2 blocks/SM -> <= 128 registers; ptxas: vector
// fp16/bf16 84-106, fp32 80-112, fp64 80-112, scalar 60-94; no shared memory -> 2 blocks (3 where
// <= 80 registers), 16-24 warps/SM, each thread with R + R + K - 1 loads in flight per strip and
// K * V independent sums. Bound: 2 K^2 FLOP per pixel and channel against 4-8 B of HBM traffic
// (dy and the input, each from HBM once), >= 12 FLOP/B, plus 2 (2R + K - 1) / (R K) L1 bytes per
// FMA (0.8 for fp16 K = 7, R = 8) and (2R + K - 1) / (R K) conversions per FMA: the FP32 pipe.
template <typename T, int K, int V, int R, int MinBlocks>
__global__ void __launch_bounds__(kThreads, MinBlocks)
    depthwise_weight_grad_strip_kernel(DepthwiseGradParams p) {
  using A = typename AccOf<T>::type;
  const DwGeometry& g = p.geo;
  constexpr int G = kGradGroups<V>;
  const uint32_t groups = static_cast<uint32_t>(p.S / V);
  const uint32_t total = static_cast<uint32_t>(dw_vec_grad_items<K, G>(groups, p.chunks));
  const T* src = static_cast<const T*>(p.src);
  const T* dy = static_cast<const T*>(p.dy);
  const uint32_t stride = static_cast<uint32_t>(thread_count());
  for (uint32_t item = static_cast<uint32_t>(global_thread()); item < total; item += stride) {
    bool valid;
    const DwGradItem it = dw_vec_grad_item<K, G>(groups, V, item, &valid);
    if (!valid) continue;
    const int64_t c = it.c;
    A part[K][V];
    depthwise_vec_grad_item<K, R, V>(
        g, p.B, p.chunks, it,
        [&](int64_t row, int64_t x) { return fetch<V>(dy + (row * g.W + x) * p.ld_dy + c); },
        [&](int64_t row, int64_t sx) { return fetch<V>(src + (row * g.W + sx) * p.ld_src + c); },
        [&](const RawPack<T, V>& raw, A(&vals)[V]) { widen<T, V>(raw, vals); },
        part);
    A* out = static_cast<A*>(p.partial) + (it.chunk * p.S + c) * (K * K) + it.ky * K;
    TM_UNROLL
    for (int v = 0; v < V; ++v) {
      TM_UNROLL
      for (int kx = 0; kx < K; ++kx) out[v * K * K + kx] = part[kx][v];
    }
  }
}

constexpr int kChanBlock = 32;
constexpr int kLanes = 8;

// Weight gradient for any kernel size: a block of 32 channels x 8 pixel lanes per (channel block,
// tap, row chunk); each lane sums every 8th pixel of the chunk, then lane sums add in a fixed order
// in shared memory (deterministic). Pixel, row and image row advance by counters: the 64-bit
// division is once per thread. Occupancy: 256 threads/block, 32 registers (fp64 34, allocated as
// 40), 1-2 KB shared memory -> 8 blocks/SM, 64 warps (fp64: 65536 / (40 * 256) -> 6 blocks, 48
// warps). Bound: load-issue (two scalar loads per FMA).
template <typename T>
__global__ void depthwise_weight_grad_kernel(DepthwiseGradParams p) {
  using A = typename AccOf<T>::type;
  __shared__ A lanes[kLanes][kChanBlock];
  const DwGeometry& g = p.geo;
  const int64_t pad = g.pad();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChanBlock + threadIdx.x;
  const int64_t t = blockIdx.y, ky = t / g.k, kx = t % g.k;
  const int64_t chunk = blockIdx.z;
  int64_t row_lo, row_hi;
  dw_chunk_rows(p.B * g.H, p.chunks, chunk, &row_lo, &row_hi);
  const int64_t lo = row_lo * g.W, hi = row_hi * g.W;
  const T* src = static_cast<const T*>(p.src);
  const T* dy = static_cast<const T*>(p.dy);
  A acc(0);
  if (c < p.S && lo + threadIdx.y < hi) {
    // Pixel, global row and row within the image advance by counters: no division per pixel.
    int64_t pix = lo + threadIdx.y, row = pix / g.W, x = pix % g.W, y = row % g.H;
    for (; pix < hi; pix += kLanes) {
      const int64_t sy = y + ky - pad, sx = x + kx - pad;
      if (sy >= 0 && sy < g.H && sx >= 0 && sx < g.W) {
        acc += to_acc(dy[pix * p.ld_dy + c]) * to_acc(src[((row - y + sy) * g.W + sx) * p.ld_src + c]);
      }
      for (x += kLanes; x >= g.W; x -= g.W) {
        ++row;
        if (++y == g.H) y = 0;
      }
    }
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < p.S) {
    A sum(0);
    for (int l = 0; l < kLanes; ++l) sum += lanes[l][threadIdx.x];
    static_cast<A*>(p.partial)[(chunk * p.S + c) * g.taps() + t] = sum;
  }
}

bool aligned(const void* ptr, size_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }
bool aligned16(const void* ptr) { return aligned(ptr, 16); }

bool fits_narrow(int64_t items) { return items <= INT32_MAX; }

template <typename T, int K>
void launch_strip(const DepthwiseParams& p, cudaStream_t stream) {
  constexpr int V = kVec<T>, R = kVecStrip<T, K>;
  const bool gated = p.gate_out != nullptr;
  const int64_t lds[] = {p.ld_src, p.ld_dst, gated ? p.ld_gate_in : 0, gated ? p.ld_gate_out : 0};
  const bool vec = dw_vector_ok(V, p.S, gated ? p.gate_channels : 0, lds, 4) && aligned16(p.src) &&
                   aligned16(p.weight) && aligned16(p.bias) && aligned16(p.dst) &&
                   (!gated || (aligned16(p.gate_in) && aligned16(p.gate_out)));
  const int64_t rows = p.B * p.geo.H;
  const int64_t vec_items = rows * dw_strips_per_row<R>(p.geo) * (p.S / V);
  const int64_t items = rows * dw_strips_per_row<kStrip>(p.geo) * p.S;
  if (vec && fits_narrow(vec_items)) {
    depthwise_strip_kernel<T, K, V, R, 2><<<blocks_for(vec_items, kThreads), kThreads, 0, stream>>>(p);
  } else if (fits_narrow(items)) {
    depthwise_strip_kernel<T, K, 1, kStrip, sizeof(T) == 8 ? 2 : 3><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(p);
  } else {
    depthwise_kernel<T><<<blocks_for(rows * p.geo.W * p.S, kThreads), kThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_grad_generic(const DepthwiseGradParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.S + kChanBlock - 1) / kChanBlock),
                  static_cast<unsigned>(p.geo.taps()), static_cast<unsigned>(p.chunks));
  depthwise_weight_grad_kernel<T><<<grid, dim3(kChanBlock, kLanes), 0, stream>>>(p);
}

template <typename T, int K>
void launch_grad_strip(const DepthwiseGradParams& p, cudaStream_t stream) {
  constexpr int V = kGradVec<T>, R = kGradStrip<T>;
  const int64_t lds[] = {p.ld_src, p.ld_dy};
  const bool vec = dw_vector_ok(V, p.S, 0, lds, 2) && aligned(p.src, V * sizeof(T)) && aligned(p.dy, V * sizeof(T));
  const bool rows_fit = fits_narrow(p.B * p.geo.H);
  const int64_t vec_items = dw_vec_grad_items<K, kGradGroups<V>>(p.S / V, p.chunks);
  const int64_t items = dw_vec_grad_items<K, kGradGroups<1>>(p.S, p.chunks);
  if (vec && rows_fit && fits_narrow(vec_items)) {
    depthwise_weight_grad_strip_kernel<T, K, V, R, 2>
        <<<blocks_for(vec_items, kThreads), kThreads, 0, stream>>>(p);
  } else if (rows_fit && fits_narrow(items)) {
    depthwise_weight_grad_strip_kernel<T, K, 1, kStrip, 2>
        <<<blocks_for(items, kThreads), kThreads, 0, stream>>>(p);
  } else {
    launch_grad_generic<T>(p, stream);
  }
}

}  // namespace

cudaError_t gnconv_depthwise_cuda(const DepthwiseParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (p.geo.k) {
      case 3: launch_strip<T, 3>(p, stream); break;
      case 5: launch_strip<T, 5>(p, stream); break;
      case 7: launch_strip<T, 7>(p, stream); break;
      default:
        depthwise_kernel<T><<<blocks_for(p.B * p.geo.H * p.geo.W * p.S, kThreads), kThreads, 0, stream>>>(p);
    }
  });
}

cudaError_t gnconv_depthwise_weight_grad_cuda(const DepthwiseGradParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (p.geo.k) {
      case 3: launch_grad_strip<T, 3>(p, stream); break;
      case 5: launch_grad_strip<T, 5>(p, stream); break;
      case 7: launch_grad_strip<T, 7>(p, stream); break;
      default: launch_grad_generic<T>(p, stream);
    }
  });
}

}  // namespace gnconv
}  // namespace tokenmix
