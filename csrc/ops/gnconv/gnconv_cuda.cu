// CUDA kernels of HorNet's gnConv: the depthwise convolution (fused with its bias, the scale and
// the first gate p0 * g_0) and its weight gradient. The 1x1 projections and the later gates run in
// the launcher (cuBLAS through ATen). Tap geometry is gnconv_math.h, shared with the CPU kernels.
//
// depthwise: one thread per (pixel, channel), channels fastest, so rows of the channels-last
//   operands are read and written coalesced; taps outside the map are skipped.
// weight grad: block (32 channels x 8 pixel lanes) per (channel block, tap, pixel chunk); the
//   lanes are summed in shared memory in a fixed order and each chunk writes its own partial, so
//   the result is deterministic.

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
        acc += to_acc(w[c * taps + (p.flip ? taps - 1 - t : t)]) * to_acc(src[q * p.ld_src + c]);
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

constexpr int kChanBlock = 32;
constexpr int kLanes = 8;

template <typename T>
__global__ void depthwise_weight_grad_kernel(DepthwiseGradParams p) {
  using A = typename AccOf<T>::type;
  __shared__ A lanes[kLanes][kChanBlock];
  const DwGeometry& g = p.geo;
  const int64_t HW = g.H * g.W, N = p.B * HW, pad = g.pad();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChanBlock + threadIdx.x;
  const int64_t t = blockIdx.y, ky = t / g.k, kx = t % g.k;
  const int64_t chunk = blockIdx.z, per = (N + p.chunks - 1) / p.chunks;
  const int64_t lo = chunk * per, hi = lo + per < N ? lo + per : N;
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

}  // namespace

cudaError_t gnconv_depthwise_cuda(const DepthwiseParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    depthwise_kernel<T><<<blocks_for(p.B * p.geo.H * p.geo.W * p.S, kThreads), kThreads, 0, stream>>>(p);
  });
}

cudaError_t gnconv_depthwise_weight_grad_cuda(const DepthwiseGradParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>((p.S + kChanBlock - 1) / kChanBlock),
                    static_cast<unsigned>(p.geo.taps()), static_cast<unsigned>(p.chunks));
    depthwise_weight_grad_kernel<T><<<grid, dim3(kChanBlock, kLanes), 0, stream>>>(p);
  });
}

}  // namespace gnconv
}  // namespace tokenmix
