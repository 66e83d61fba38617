// CUDA kernels of HorNet's gnConv: the depthwise convolution (fused with its bias, the scale and
// the first gate p0 * g_0) and its weight gradient. The 1x1 projections and the later gates run in
// the launcher (cuBLAS through ATen). Tap geometry and strip blocking are gnconv_math.h, shared
// with the CPU kernels and with the host-side emulation the tests run.
//
// depthwise, K in {3, 5, 7}: one thread per strip of kStrip outputs along a row of one channel,
//   channels fastest, so rows of the channels-last operands are read and written coalesced; each
//   loaded input feeds up to K taps from registers. Weights are tap-major ([k * k, S]) so a warp's
//   weight loads coalesce too. Other kernel sizes: one thread per (pixel, channel).
// weight grad: one thread per (row chunk, kernel row, channel) sums its chunk's rows strip by
//   strip into K registers and writes its own partial, so the result is deterministic. Other
//   kernel sizes: a block (32 channels x 8 pixel lanes) per (channel block, tap, row chunk), the
//   lanes summed in shared memory in a fixed order.

#include <cstdint>

#include "gnconv_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace gnconv {
namespace {

using namespace cu;

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

template <typename T, int K>
__global__ void __launch_bounds__(kThreads, 3) depthwise_strip_kernel(DepthwiseParams p) {
  using A = typename AccOf<T>::type;
  const DwGeometry& g = p.geo;
  const int64_t HW = g.H * g.W, taps = g.taps();
  const int64_t total = p.B * g.H * dw_strips_per_row<kStrip>(g) * p.S;
  const T* src = static_cast<const T*>(p.src);
  const T* w = static_cast<const T*>(p.weight);
  T* dst = static_cast<T*>(p.dst);
  const T* gate_in = static_cast<const T*>(p.gate_in);
  T* gate_out = static_cast<T*>(p.gate_out);
  const A scale = static_cast<A>(p.scale);
  for (int64_t item = global_thread(); item < total; item += thread_count()) {
    const DwStrip s = dw_strip<kStrip>(g, p.S, item);
    const int64_t c = s.c;
    const bool gate = gate_out != nullptr && c < p.gate_channels;
    const A bias = p.bias != nullptr ? to_acc(static_cast<const T*>(p.bias)[c]) : A(0);
    depthwise_item<K, kStrip>(
        g, s, bias,
        [&](int64_t b, int64_t sy, int64_t sx) {
          return to_acc(src[(b * HW + sy * g.W + sx) * p.ld_src + c]);
        },
        [&](int t) { return to_acc(w[(p.flip ? taps - 1 - t : t) * p.S + c]); },
        [&](int64_t pix, A acc) {
          const T out = from_acc<T>(acc * scale);
          dst[pix * p.ld_dst + c] = out;
          if (gate) {
            const A gin = to_acc(gate_in[pix * p.ld_gate_in + c]);
            gate_out[pix * p.ld_gate_out + c] = from_acc<T>(gin * to_acc(out));
          }
        });
  }
}

template <typename T, int K>
__global__ void depthwise_weight_grad_strip_kernel(DepthwiseGradParams p) {
  using A = typename AccOf<T>::type;
  const DwGeometry& g = p.geo;
  const int64_t HW = g.H * g.W;
  const int64_t total = p.chunks * K * p.S;
  const T* src = static_cast<const T*>(p.src);
  const T* dy = static_cast<const T*>(p.dy);
  for (int64_t item = global_thread(); item < total; item += thread_count()) {
    const DwGradItem it = dw_grad_item<K>(p.S, item);
    const int64_t c = it.c;
    A part[K];
    depthwise_grad_item<K, kStrip>(
        g, p.B, p.chunks, it,
        [&](int64_t row, int64_t x) { return to_acc(dy[(row * g.W + x) * p.ld_dy + c]); },
        [&](int64_t b, int64_t sy, int64_t sx) {
          return to_acc(src[(b * HW + sy * g.W + sx) * p.ld_src + c]);
        },
        part);
    A* out = static_cast<A*>(p.partial) + (it.chunk * p.S + c) * g.taps() + it.ky * K;
    TM_UNROLL
    for (int kx = 0; kx < K; ++kx) out[kx] = part[kx];
  }
}

constexpr int kChanBlock = 32;
constexpr int kLanes = 8;

template <typename T>
__global__ void depthwise_weight_grad_kernel(DepthwiseGradParams p) {
  using A = typename AccOf<T>::type;
  __shared__ A lanes[kLanes][kChanBlock];
  const DwGeometry& g = p.geo;
  const int64_t HW = g.H * g.W, pad = g.pad();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChanBlock + threadIdx.x;
  const int64_t t = blockIdx.y, ky = t / g.k, kx = t % g.k;
  const int64_t chunk = blockIdx.z;
  int64_t row_lo, row_hi;
  dw_chunk_rows(p.B * g.H, p.chunks, chunk, &row_lo, &row_hi);
  const int64_t lo = row_lo * g.W, hi = row_hi * g.W;
  const T* src = static_cast<const T*>(p.src);
  const T* dy = static_cast<const T*>(p.dy);
  A acc(0);
  if (c < p.S) {
    for (int64_t pix = lo + threadIdx.y; pix < hi; pix += kLanes) {
      const int64_t b = pix / HW, y = (pix % HW) / g.W, x = pix % g.W;
      const int64_t sy = y + ky - pad, sx = x + kx - pad;
      if (sy < 0 || sy >= g.H || sx < 0 || sx >= g.W) continue;
      acc += to_acc(dy[pix * p.ld_dy + c]) * to_acc(src[((b * g.H + sy) * g.W + sx) * p.ld_src + c]);
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

template <typename T, int K>
void launch_strip(const DepthwiseParams& p, cudaStream_t stream) {
  const int64_t items = p.B * p.geo.H * dw_strips_per_row<kStrip>(p.geo) * p.S;
  depthwise_strip_kernel<T, K><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(p);
}

template <typename T, int K>
void launch_grad_strip(const DepthwiseGradParams& p, cudaStream_t stream) {
  const int64_t items = p.chunks * K * p.S;
  depthwise_weight_grad_strip_kernel<T, K><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(p);
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
      default: {
        const dim3 grid(static_cast<unsigned>((p.S + kChanBlock - 1) / kChanBlock),
                        static_cast<unsigned>(p.geo.taps()), static_cast<unsigned>(p.chunks));
        depthwise_weight_grad_kernel<T><<<grid, dim3(kChanBlock, kLanes), 0, stream>>>(p);
      }
    }
  });
}

}  // namespace gnconv
}  // namespace tokenmix
