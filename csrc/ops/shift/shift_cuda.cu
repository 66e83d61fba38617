// CUDA kernels of the shifted / rearranged token-mixing family that only move data: gather (a
// grid read through a shift or fold map) and unfold (the fold's inverse, with the padded copies
// added for the fold's adjoint). No torch headers: shift_cuda.cpp fills the params structs of
// shift_params.h. The projections live in shift_gemm.cu.
//
// gather: the source element of each grid element found by map_offset (shift_math.h), the split
//   of source_offset, the function the CPU's strided path uses; 0 where it is -1.
// unfold: the arithmetic of shift_cpu.cpp's unfold_typed (fold_target, fold_grid_pos, the second
//   padded copy with wrap), the two copies added in the accumulation type.
// Both walk their output in its own memory order (channels fastest for channels_last outputs,
// columns fastest otherwise), so the writes coalesce and, for the usual same-layout source, so do
// the reads; where the host proves the layout allows, a work item is a 16-byte vector along that
// dimension (see the kernels). No division runs in the grid-stride loop: each thread splits its
// first item and the stride once (split_digits) and advances by mixed-radix adds; the index type
// is 32-bit when the element count and the channels / padded positions the kernels divide are
// below 2^31 (below 2^31 the grid-stride step cannot wrap an unsigned 32-bit index), and int64
// otherwise, where a Fold still divides by the region once per item. Offsets are always 64-bit.
// Limits: none beyond the grid-stride loop's (any size, any strides); a Shift map's dyx must be
// device memory.

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "shift_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace shift {
namespace {

using namespace cu;

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

// 16 bytes of any dtype: the vector paths copy raw elements.
using Vec16 = uint4;

template <typename T>
__device__ __forceinline__ void gather_one(const GatherParams& p, const T* __restrict__ src,
                                           T* __restrict__ out, const MapChannel& ch, int64_t k,
                                           int64_t b, int64_t gy, int64_t gx) {
  const int64_t o = map_offset(p.map, p.src_st, ch, b * p.src_st.b, gy, gx);
  out[offset(p.out_st, b, k, gy, gx)] = o < 0 ? from_acc<T>(typename AccOf<T>::type(0)) : src[o];
}

// gather: one work item per V consecutive elements along the output's fastest dimension (V = 1:
// one element; V = 16 / sizeof(T): a 16-byte vector, launched only where the host found both
// tensors stride 1 along it, every other stride and the base pointers 16-byte aligned, that
// dimension a multiple of V, and the map not one that scatters it: no Fold for channels, no axis-3
// Fold for columns). A vector item reads one 16-byte run where the map moves its V elements
// together: Identity; axis-2 Fold (rows move whole); a Shift of the item's columns by a multiple
// of V (the zero-mode bounds and the circular wrap are multiples of V too, so the run is all
// inside or all outside); a Shift of the item's channels that all share one (dy, dx), as the
// grouped shifts of AS-MLP / CycleMLP do (checked per item from the dyx table: 2 V cached 8-byte
// reads). Otherwise the item copies its V elements one by one (gather_item_is_run, shift_math.h).
// Walk: digits (fastest first) (gx / V, gy, k, b) or, channels fastest, (k / V, gx, gy, b); the
// first item and the grid stride are split once per thread, then advanced by mixed-radix adds.
// Occupancy (sm_90, 32-bit path): 256 threads, no shared memory; scalar items 26 registers
// (allocated 32) -> 8 blocks, 2048 threads/SM (100%); vector items 52 registers (allocated 56)
// -> 65536 / (256 x 56) = 4 blocks, 1024 threads (50%). Memory bound: 2 x 16 bytes moved per
// vector item against a few dozen integer instructions; 1024 threads x 16 bytes = 16 KB of loads
// in flight per SM, about what H100 HBM needs (3.35 TB/s x ~0.7 us latency / 132 SMs = ~18 KB).
template <typename T, typename I, int V>
__global__ void gather_kernel(GatherParams p, I total, I r0, I r1, I r2, bool c_fastest) {
  const T* __restrict__ src = static_cast<const T*>(p.src);
  T* __restrict__ out = static_cast<T*>(p.out);
  const TokenMap& m = p.map;
  I t = flat_thread<I>();
  Digits4<I> q = split_digits<I>(t, r0, r1, r2);
  const Digits4<I> step = split_digits<I>(flat_stride<I>(), r0, r1, r2);
  for (; t < total; t += flat_stride<I>(), advance_digits<I>(q, step, r0, r1, r2)) {
    const I k = c_fastest ? q.d[0] * V : q.d[2];
    const int64_t gy = static_cast<int64_t>(c_fastest ? q.d[2] : q.d[1]);
    const int64_t gx = static_cast<int64_t>(c_fastest ? q.d[1] : q.d[0] * V);
    const int64_t b = static_cast<int64_t>(q.d[3]);
    const MapChannel ch = map_channel<I>(m, p.src_st, k);
    if (V == 1) {
      gather_one<T>(p, src, out, ch, static_cast<int64_t>(k), b, gy, gx);
      continue;
    }
    if (gather_item_is_run(m, ch, static_cast<int64_t>(k), c_fastest, V)) {
      const int64_t o = map_offset(m, p.src_st, ch, b * p.src_st.b, gy, gx);
      const Vec16 v = o < 0 ? Vec16{0, 0, 0, 0} : *reinterpret_cast<const Vec16*>(src + o);
      *reinterpret_cast<Vec16*>(out + offset(p.out_st, b, static_cast<int64_t>(k), gy, gx)) = v;
    } else {
      // The V sources one by one (columns fastest: one channel, ch; channels fastest: no Fold, so
      // channel k + e is digit c = k + e of region 1), then one 16-byte store: the output side of
      // a vector item is always one aligned run, and V scalar stores V elements apart would touch
      // V times the sectors.
      union {
        Vec16 v;
        T e[V];
      } y;
      const int64_t base = b * p.src_st.b;
      TM_UNROLL
      for (int e = 0; e < V; ++e) {
        const MapChannel ce =
            c_fastest ? map_channel_of<I>(m, p.src_st, ChannelDigits<I>{static_cast<I>(k + e), I(0)}) : ch;
        const int64_t o = map_offset(m, p.src_st, ce, base, gy, c_fastest ? gx : gx + e);
        y.e[e] = o < 0 ? from_acc<T>(typename AccOf<T>::type(0)) : src[o];
      }
      *reinterpret_cast<Vec16*>(out + offset(p.out_st, b, static_cast<int64_t>(k), gy, gx)) = y.v;
    }
  }
}

// unfold: one work item per V consecutive output elements along the fastest dimension; V > 1
// only for an axis-2 Fold with columns fastest (the fold keeps columns, so the V outputs read V
// consecutive grid columns at each padded copy), under the same host checks as gather's vectors.
// The arithmetic is shift_cpu.cpp's unfold_typed (fold_target, fold_grid_pos, the second padded
// copy with wrap), the two copies added in the accumulation type.
// Walk: digits (w / V, h, c, b) or, channels fastest, (c, w, h, b); advanced as in gather.
// Occupancy (sm_90, 32-bit path): 256 threads, no shared memory, 32 to 40 registers (allocated
// 40) -> 65536 / (256 x 40) = 6 blocks, 1536 threads/SM (75%). Memory bound as gather: up to
// 3 x 16 bytes per vector item, 1536 x 16 = 24 KB of loads in flight per SM.
template <typename T, typename I, int V>
__global__ void unfold_kernel(UnfoldParams p, I total, I r0, I r1, I r2, bool c_fastest) {
  using A = typename AccOf<T>::type;
  const T* __restrict__ grid = static_cast<const T*>(p.grid);
  T* __restrict__ out = static_cast<T*>(p.out);
  const TokenMap& m = p.map;
  I t = flat_thread<I>();
  Digits4<I> q = split_digits<I>(t, r0, r1, r2);
  const Digits4<I> step = split_digits<I>(flat_stride<I>(), r0, r1, r2);
  for (; t < total; t += flat_stride<I>(), advance_digits<I>(q, step, r0, r1, r2)) {
    const I c = c_fastest ? q.d[0] : q.d[2];
    const int64_t h = static_cast<int64_t>(c_fastest ? q.d[2] : q.d[1]);
    const int64_t w = static_cast<int64_t>(c_fastest ? q.d[1] : q.d[0] * V);
    const int64_t b = static_cast<int64_t>(q.d[3]);
    const int64_t i = m.axis == 2 ? h : w, other = m.axis == 2 ? w : h;
    const int64_t pos = fold_target(m, i);
    const bool second = m.wrap && pos + m.L < m.Lp;
    const GridPos g = fold_grid_pos_i<I>(m, c, static_cast<I>(pos), other);
    const int64_t o1 = offset(p.grid_st, b, g.k, g.gy, g.gx);
    int64_t o2 = 0;
    if (second) {
      const GridPos g2 = fold_grid_pos_i<I>(m, c, static_cast<I>(pos + m.L), other);
      o2 = offset(p.grid_st, b, g2.k, g2.gy, g2.gx);
    }
    const int64_t oo = offset(p.out_st, b, static_cast<int64_t>(c), h, w);
    if (V == 1) {
      A v = to_acc(grid[o1]);
      if (second) v += to_acc(grid[o2]);
      out[oo] = from_acc<T>(v);
      continue;
    }
    union {
      Vec16 v;
      T e[V];
    } x1, x2, y;
    x1.v = *reinterpret_cast<const Vec16*>(grid + o1);
    if (second) x2.v = *reinterpret_cast<const Vec16*>(grid + o2);
    TM_UNROLL
    for (int e = 0; e < V; ++e) {
      A v = to_acc(x1.e[e]);
      if (second) v += to_acc(x2.e[e]);
      y.e[e] = from_acc<T>(v);
    }
    *reinterpret_cast<Vec16*>(out + oo) = y.v;
  }
}

// Channels fastest where the output's channel stride is the smallest of c and w (channels_last).
bool channels_fastest(const Strides4& s) { return s.c < s.w; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Launch shape of an elementwise walk over [B, d1 (channels), d2 (rows), d3 (columns)] in V-wide
// items along the fastest dimension: 32-bit indices where the item count, every digit and the
// largest channel or padded position the kernel divides fit below 2^31 (the grid-stride sum
// t + stride < 2^31 + 2^28 cannot wrap an unsigned 32-bit index); int64 otherwise.
static_assert(kMaxBlocks * kThreads <= (int64_t{1} << 28), "the 32-bit grid-stride step may wrap");

template <typename Launch>
cudaError_t launch_walk(DType dtype, int64_t B, int64_t d1, int64_t d2, int64_t d3, bool cf,
                        bool vec, int64_t extra_range, Launch launch) {
  const int64_t total = B * d1 * d2 * d3;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = 16 / sizeof(T);
    const int64_t v = vec ? kV : 1;
    const int64_t items = total / v;
    // Digits, fastest first: (d3 / v, d2, d1) or, channels fastest, (d1 / v, d3, d2).
    const int64_t r0 = cf ? d1 / v : d3 / v, r1 = cf ? d3 : d2, r2 = cf ? d2 : d1;
    const int blocks = blocks_for(items, kThreads);
    if (total <= INT32_MAX && extra_range <= INT32_MAX) {
      const uint32_t a[4] = {static_cast<uint32_t>(items), static_cast<uint32_t>(r0),
                             static_cast<uint32_t>(r1), static_cast<uint32_t>(r2)};
      if (vec) {
        launch(tag, uint32_t{0}, std::integral_constant<int, kV>{}, blocks, a);
      } else {
        launch(tag, uint32_t{0}, std::integral_constant<int, 1>{}, blocks, a);
      }
    } else {
      const int64_t a[4] = {items, r0, r1, r2};
      if (vec) {
        launch(tag, int64_t{0}, std::integral_constant<int, kV>{}, blocks, a);
      } else {
        launch(tag, int64_t{0}, std::integral_constant<int, 1>{}, blocks, a);
      }
    }
  });
}

}  // namespace

cudaError_t shift_gather_cuda(const GatherParams& p, cudaStream_t stream) {
  const TokenMap& m = p.map;
  const int64_t K = m.K(), GH = m.GH(), GW = m.GW();
  const bool cf = channels_fastest(p.out_st);
  const int64_t v = 16 / static_cast<int64_t>(dtype_size(p.dtype));
  const bool vec = aligned16(p.src) && aligned16(p.out) &&
                   gather_vector_ok(m, p.src_st, p.out_st, cf, v);
  return launch_walk(p.dtype, p.B, K, GH, GW, cf, vec, K,
                     [&](auto tag, auto index, auto width, int blocks, const auto& a) {
                       using T = decltype(tag);
                       using I = decltype(index);
                       gather_kernel<T, I, decltype(width)::value>
                           <<<blocks, kThreads, 0, stream>>>(p, a[0], a[1], a[2], a[3], cf);
                     });
}

cudaError_t shift_unfold_cuda(const UnfoldParams& p, cudaStream_t stream) {
  const TokenMap& m = p.map;
  const bool cf = channels_fastest(p.out_st);
  const int64_t v = 16 / static_cast<int64_t>(dtype_size(p.dtype));
  const bool vec = aligned16(p.grid) && aligned16(p.out) &&
                   unfold_vector_ok(m, p.grid_st, p.out_st, cf, v);
  // The kernel divides padded positions (< Lp) and builds grid channels (< K) in its index type.
  const int64_t range = std::max(m.K(), m.Lp);
  return launch_walk(p.dtype, p.B, m.C, m.H, m.W, cf, vec, range,
                     [&](auto tag, auto index, auto width, int blocks, const auto& a) {
                       using T = decltype(tag);
                       using I = decltype(index);
                       unfold_kernel<T, I, decltype(width)::value>
                           <<<blocks, kThreads, 0, stream>>>(p, a[0], a[1], a[2], a[3], cf);
                     });
}

}  // namespace shift
}  // namespace tokenmix
