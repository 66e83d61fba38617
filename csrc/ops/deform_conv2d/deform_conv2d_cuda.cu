// CUDA kernels of deformable convolution (DCNv1/v2, torchvision semantics): the bilinear sampling
// around the channel-mixing GEMMs, which the launcher runs through ATen (cuBLAS) on a bounded
// chunk of images. Sampling math is deform_math.h, shared with the CPU kernels.
//
// im2col: one thread per (image, offset group, tap, output pixel) and run of up to 16 of the
//   group's channels (SampleItem, deform_math.h): the offsets, mask and corners are read and
//   computed once per run; consecutive threads take consecutive pixels, so offset, mask and column
//   accesses coalesce.
// col2im: the same threads scatter grad_cols to the four neighbours with atomic adds into an
//   accumulation-type buffer (order-dependent rounding: the CUDA backward is not bit-reproducible;
//   the CPU one is).
// col2im_coord: one thread per (image, offset group, tap, pixel) sums over its group's channels:
//   the offset and mask gradients, deterministic.

#include <cstdint>

#include "deform_conv2d_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace deform {
namespace {

using namespace cu;

struct Index {
  int64_t b, c, tap, pix;
};

// Thread index t over [nb, G, kk, P] of the coordinate kernel (i.c is the offset group).
__device__ __forceinline__ Index decompose(const DeformParams& p, int64_t t, int64_t channels) {
  const int64_t P = p.geo.Ho * p.geo.Wo, kk = p.geo.taps();
  Index i;
  i.pix = t % P;
  t /= P;
  i.tap = t % kk;
  t /= kk;
  i.c = t % channels;
  i.b = p.b0 + t / channels;
  return i;
}

// Sample position and modulation of tap `tap` of offset group `go` at output pixel `pix`.
template <typename T, typename A>
__device__ __forceinline__ void position(const DeformParams& p, int64_t b, int64_t go, int64_t tap,
                                         int64_t pix, A* y, A* x, A* m) {
  const Geometry& g = p.geo;
  const int64_t P = g.Ho * g.Wo;
  const int64_t ch = (b * p.G + go) * g.taps() + tap;
  const T* off = static_cast<const T*>(p.offset);
  *y = static_cast<A>(g.base_y(pix / g.Wo, tap)) + to_acc(off[(2 * ch) * P + pix]);
  *x = static_cast<A>(g.base_x(pix % g.Wo, tap)) + to_acc(off[(2 * ch + 1) * P + pix]);
  *m = p.mask != nullptr ? to_acc(static_cast<const T*>(p.mask)[ch * P + pix]) : A(1);
}

// Channels per sampling work item: the position, offsets, mask and corners are computed once for
// this many columns, and there are still enough items to fill the GPU at small batches.
constexpr int64_t kChansPerItem = 16;

// Calls body(item, image, corners, modulation) for every sampling work item of the chunk that
// this thread owns (grid-stride), with the item's sample position resolved once.
template <typename T, typename A, typename Body>
__device__ __forceinline__ void for_each_sample(const DeformParams& p, const Body& body) {
  const Geometry& g = p.geo;
  const int64_t P = g.Ho * g.Wo, kk = g.taps(), Cg = p.Cin / p.G;
  const int64_t total = sample_items(p.nb, p.G, Cg, kChansPerItem, kk, P);
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const SampleItem it = sample_item(p.G, Cg, kChansPerItem, kk, P, t);
    const int64_t b = p.b0 + it.b;
    A y, x, m;
    position<T, A>(p, b, it.go, it.tap, it.pix, &y, &x, &m);
    body(it, b, corners(y, x, g.H, g.W, true), m);
  }
}

template <typename T>
__global__ void im2col_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const int64_t HW = p.geo.H * p.geo.W, P = p.geo.Ho * p.geo.Wo, kk = p.geo.taps();
  const T* input = static_cast<const T*>(p.input);
  T* cols = static_cast<T*>(p.cols);
  for_each_sample<T, A>(p, [&](const SampleItem& it, int64_t b, const Corners<A>& cn, A m) {
    for (int64_t c = it.c_lo; c < it.c_hi; ++c) {
      const T* plane = input + (b * p.Cin + c) * HW;
      A val = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (cn.valid[k]) val += cn.w[k] * to_acc(plane[cn.idx[k]]);
      }
      cols[column_index(p.Cin, kk, P, it.b, c, it.tap, it.pix)] = from_acc<T>(val * m);
    }
  });
}

template <typename T>
__global__ void col2im_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const int64_t HW = p.geo.H * p.geo.W, P = p.geo.Ho * p.geo.Wo, kk = p.geo.taps();
  const T* grad_cols = static_cast<const T*>(p.grad_cols);
  A* grad_input = static_cast<A*>(p.grad_input);
  for_each_sample<T, A>(p, [&](const SampleItem& it, int64_t b, const Corners<A>& cn, A m) {
    for (int64_t c = it.c_lo; c < it.c_hi; ++c) {
      const A gm = to_acc(grad_cols[column_index(p.Cin, kk, P, it.b, c, it.tap, it.pix)]) * m;
      A* plane = grad_input + (b * p.Cin + c) * HW;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (cn.valid[k]) atomicAdd(plane + cn.idx[k], gm * cn.w[k]);
      }
    }
  });
}

template <typename T>
__global__ void col2im_coord_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const Geometry& g = p.geo;
  const int64_t HW = g.H * g.W, P = g.Ho * g.Wo, kk = g.taps(), Cg = p.Cin / p.G;
  const int64_t total = p.nb * p.G * kk * P;
  const T* input = static_cast<const T*>(p.input);
  const T* grad_cols = static_cast<const T*>(p.grad_cols);
  T* grad_offset = static_cast<T*>(p.grad_offset);
  T* grad_mask = static_cast<T*>(p.grad_mask);
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const Index i = decompose(p, t, p.G);  // i.c is the offset group
    A y, x, m;
    position<T, A>(p, i.b, i.c, i.tap, i.pix, &y, &x, &m);
    const Corners<A> cf = corners(y, x, g.H, g.W, true);
    const Corners<A> cg = corners(y, x, g.H, g.W, false);
    A gy = 0, gx = 0, gmask = 0;
    for (int64_t c = i.c * Cg; c < (i.c + 1) * Cg; ++c) {
      const A gcol = to_acc(grad_cols[(((i.b - p.b0) * p.Cin + c) * kk + i.tap) * P + i.pix]);
      const T* plane = input + (i.b * p.Cin + c) * HW;
      A v[4], val = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[k] = cg.valid[k] ? to_acc(plane[cg.idx[k]]) : A(0);
        if (cf.valid[k]) val += cf.w[k] * v[k];
      }
      gmask += gcol * val;
      gy += gcol * m * grad_y(v, cg.lx);
      gx += gcol * m * grad_x(v, cg.ly);
    }
    const int64_t ch = (i.b * p.G + i.c) * kk + i.tap;
    grad_offset[(2 * ch) * P + i.pix] = from_acc<T>(gy);
    grad_offset[(2 * ch + 1) * P + i.pix] = from_acc<T>(gx);
    if (grad_mask != nullptr) grad_mask[ch * P + i.pix] = from_acc<T>(gmask);
  }
}

}  // namespace

cudaError_t deform_im2col_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total =
      sample_items(p.nb, p.G, p.Cin / p.G, kChansPerItem, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    im2col_kernel<T><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
  });
}

cudaError_t deform_col2im_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total =
      sample_items(p.nb, p.G, p.Cin / p.G, kChansPerItem, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    col2im_kernel<T><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
  });
}

cudaError_t deform_col2im_coord_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total = p.nb * p.G * p.geo.taps() * p.geo.Ho * p.geo.Wo;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    col2im_coord_kernel<T><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
  });
}

}  // namespace deform
}  // namespace tokenmix
