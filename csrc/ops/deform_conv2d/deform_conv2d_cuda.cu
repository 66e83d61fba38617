// CUDA kernels of deformable convolution (DCNv1/v2, torchvision semantics). Sampling math is
// deform_conv2d_math.h, shared with the CPU kernels and the host-side emulation the tests run.
//
// fused forward (fp16/bf16): sampling feeds tensor-core tiles in shared memory directly; see the
//   banner of fused_forward_kernel.
// The other kernels do the bilinear sampling around the channel-mixing GEMMs, which the launcher
// runs through ATen (cuBLAS) on a bounded chunk of images (fp32, fp64, and every backward):
//
// im2col: one thread per (image, offset group, tap, output pixel) and run of up to 16 of the
//   group's channels (SampleItem, deform_conv2d_math.h): the offsets, mask and corners are read and
//   computed once per run; consecutive threads take consecutive pixels, so offset, mask and column
//   accesses coalesce.
// col2im: the same threads scatter grad_cols to the four neighbours with atomic adds into an
//   accumulation-type buffer (order-dependent rounding: the CUDA backward is not bit-reproducible;
//   the CPU one is).
// col2im_coord: one thread per (image, offset group, tap, pixel) sums over its group's channels:
//   the offset and mask gradients, deterministic.

#include <mma.h>

#include <cstdint>

#include "deform_conv2d_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace deform_conv2d {
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
  const int64_t ch = offset_channel(p.G, g.taps(), b, go, tap);
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

// The masked bilinear sample of one channel plane: a column entry in the input dtype.
template <typename T, typename A>
__device__ __forceinline__ T sample(const T* plane, const Corners<A>& cn, A m) {
  A val = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (cn.valid[k]) val += cn.w[k] * to_acc(plane[cn.idx[k]]);
  }
  return from_acc<T>(val * m);
}

template <typename T>
__global__ void im2col_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const int64_t HW = p.geo.H * p.geo.W, P = p.geo.Ho * p.geo.Wo, kk = p.geo.taps();
  const T* input = static_cast<const T*>(p.input);
  T* cols = static_cast<T*>(p.cols);
  for_each_sample<T, A>(p, [&](const SampleItem& it, int64_t b, const Corners<A>& cn, A m) {
    for (int64_t c = it.c_lo; c < it.c_hi; ++c) {
      cols[column_index(p.Cin, kk, P, it.b, c, it.tap, it.pix)] =
          sample(input + (b * p.Cin + c) * HW, cn, m);
    }
  });
}

// Fused forward: the implicit GEMM of ImplicitGemm (deform_conv2d_math.h) on tensor cores (WMMA,
// 16x16x16, fp32 accumulators). Per K chunk each thread samples its run of kRun columns of one
// row into shared memory (column-major A, so the 64 threads of a column write consecutive
// addresses), the block stages the matching BN x BK slice of the tap-major weight, and each of
// the 8 warps multiplies a 32x32 piece of the 64x128 tile. The accumulators go through shared
// memory so the output is written with pixels fastest, as NCHW lays them out. Limits: fp16/bf16,
// one weight group, sm_80+ (bf16 fragments). A single-stage loop: the latency of the gathers is
// hidden by each thread's kRun unrolled samples being in flight together and by a second resident
// block per SM (112 registers a thread; capping them for a third block spills).
namespace fused {
using IG = ImplicitGemm;
constexpr int kLdA = IG::BM + 8;  // As[k][m]; padded rows keep WMMA's 32-byte alignment
constexpr int kLdB = IG::BK + 8;  // Bs[n][k]
constexpr int kLdC = IG::BM + 4;  // Cs[n][m], fp32
constexpr int kBytesAB = (IG::BK * kLdA + IG::BN * kLdB) * 2;
constexpr int kBytesC = IG::BN * kLdC * 4;
constexpr int kSmemBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;
constexpr int kWarpsM = 2, kWarpRows = IG::BM / kWarpsM, kWarpCols = IG::BN / (IG::kThreads / kWarp / kWarpsM);
constexpr int kFragsM = kWarpRows / 16, kFragsN = kWarpCols / 16;
static_assert(IG::kThreads % IG::BM == 0 && IG::BK % IG::kRun == 0, "thread slots must tile the chunk");
static_assert(kFragsM * 16 * kWarpsM == IG::BM && kFragsN * 16 * (IG::kThreads / kWarp / kWarpsM) == IG::BN,
              "warps must tile the block");
}  // namespace fused

template <typename T>
__global__ void __launch_bounds__(ImplicitGemm::kThreads, 2) fused_forward_kernel(DeformParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace fused;
  using A = float;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + IG::BK * kLdA;
  float* Cs = reinterpret_cast<float*>(smem);

  const Geometry& g = p.geo;
  const int64_t HW = g.H * g.W, kk = g.taps(), Cg = p.Cin / p.G;
  const IG ig = IG::make(p.nb, p.Cin, p.Cout, kk, g.Ho * g.Wo);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * IG::BM, n0 = static_cast<int64_t>(blockIdx.y) * IG::BN;
  const int t = threadIdx.x, warp = t / kWarp;
  const int wm = (warp % kWarpsM) * kWarpRows, wn = (warp / kWarpsM) * kWarpCols;
  const T* input = static_cast<const T*>(p.input);
  const T* wt = static_cast<const T*>(p.weight_tk);

  // This thread's A row: its image and pixel, fixed for the whole K walk.
  const int a_row = IG::a_row(t), a_col = IG::a_col(t);
  const int64_t m = m0 + a_row;
  const bool row_ok = m < ig.M;
  const int64_t b = row_ok ? p.b0 + ig.image(m) : 0, pix = row_ok ? ig.pixel(m) : 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsM][kFragsN];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  for (int64_t k0 = 0; k0 < ig.K; k0 += IG::BK) {
    // A: kRun samples; the position is recomputed only when the tap or offset group changes.
    ColumnWalk col(k0 + a_col, p.Cin, Cg);
    Corners<A> cn{};
    A mod = 0;
#pragma unroll
    for (int r = 0; r < IG::kRun; ++r, col.next()) {
      T v = from_acc<T>(0.0f);
      if (row_ok && col.k < ig.K) {
        if (col.fresh) {
          A y, x;
          position<T, A>(p, b, col.go, col.tap, pix, &y, &x, &mod);
          cn = corners(y, x, g.H, g.W, true);
        }
        v = sample(input + (b * p.Cin + col.c) * HW, cn, mod);
      }
      As[(a_col + r) * kLdA + a_row] = v;
    }
    // B: the Wt slice, consecutive threads on consecutive k of one output channel.
    for (int i = t; i < IG::BN * IG::BK; i += IG::kThreads) {
      const int n = i / IG::BK, kl = i % IG::BK;
      const bool ok = n0 + n < ig.N && k0 + kl < ig.K;
      Bs[n * kLdB + kl] = ok ? wt[(n0 + n) * ig.K + k0 + kl] : from_acc<T>(0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kf = 0; kf < IG::BK; kf += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) wmma::load_matrix_sync(fa[i], As + kf * kLdA + wm + 16 * i, kLdA);
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn + 16 * j) * kLdB + kf, kLdB);
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      wmma::store_matrix_sync(Cs + (wn + 16 * j) * kLdC + wm + 16 * i, acc[i][j], kLdC, wmma::mem_col_major);
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = t; i < IG::BM * IG::BN; i += IG::kThreads) {
    const int r = i % IG::BM, n = i / IG::BM;
    const int64_t mm = m0 + r, nn = n0 + n;
    if (mm < ig.M && nn < ig.N) {
      const float v = Cs[n * kLdC + r] + (bias != nullptr ? to_acc(bias[nn]) : 0.0f);
      out[ig.out_index(mm + p.b0 * ig.P, nn)] = from_acc<T>(v);
    }
  }
#else
  __trap();  // deform_forward_fused_supported() never selects this kernel below sm_80
#endif
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

bool deform_forward_fused_supported(const DeformParams& p, int64_t weight_groups) {
  // The grid is (row blocks, column blocks): gridDim.y is at most 65535, so more than 65535 * BN
  // output channels take the unfused path.
  const ImplicitGemm ig = ImplicitGemm::make(p.nb, p.Cin, p.Cout, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  return weight_groups == 1 && ig.row_blocks() <= 0x7fffffff && ig.col_blocks() <= 65535 &&
         cu::tensor_core_dtype_on_device(p.dtype);
}

cudaError_t deform_forward_fused_cuda(const DeformParams& p, cudaStream_t stream) {
  const ImplicitGemm ig = ImplicitGemm::make(p.nb, p.Cin, p.Cout, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  if (ig.row_blocks() > 0x7fffffff || ig.col_blocks() > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ig.row_blocks()), static_cast<unsigned>(ig.col_blocks()));
  switch (p.dtype) {
    case DType::Float16:
      fused_forward_kernel<__half><<<grid, ImplicitGemm::kThreads, 0, stream>>>(p);
      break;
    case DType::BFloat16:
      fused_forward_kernel<__nv_bfloat16><<<grid, ImplicitGemm::kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t deform_col2im_coord_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total = p.nb * p.G * p.geo.taps() * p.geo.Ho * p.geo.Wo;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    col2im_coord_kernel<T><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
  });
}

}  // namespace deform_conv2d
}  // namespace tokenmix
