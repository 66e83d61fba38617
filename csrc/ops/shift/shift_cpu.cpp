// CPU kernels of the shifted / rearranged token-mixing family: the four primitives of
// shift_problem.h.
//
// Everything moves whole grid rows, read and written through shift_rows_cpu.h.
//
// The projections (linear, weight_grad) run over tiles: ranges of whole grid rows, across images,
// of about kTileFloats / max(K, J) pixels (at least kMinTilePixels, so that Hire-MLP's small later
// maps still give wide GEMMs). A tile's operand is packed through the map into per-thread scratch
// as a [K, pixels] matrix in the accumulation type, which is the GEMM's operand load: the shifted
// or folded tensor never exists beyond one tile. The projection is the register-blocked small GEMM
// of cpu/blocked_gemm.h (pixels across the vector lanes, the bias as the sums' initial value) over
// the whole tile into scratch, whose rows then reach the output: copied image by image (NCHW),
// transposed (channels_last), or through the store map. Where each image's part of the tile is
// whole vectors, an NCHW output is written straight from the registers instead; elsewhere a
// per-image projection would end each image's columns in a partial vector, which on Hire-MLP's
// 14 x 14 maps costs more than the copy. The weight gradient is ATen's GEMM (at::mm_out),
// single-threaded inside the tile loop; it sums per-chunk partials (a chunk: a fixed range of
// tiles) in chunk order, so its bits do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/blocked_gemm.h"
#include "cpu/rows.h"
#include "cpu/scratch.h"
#include "shift_rows_cpu.h"
#include "shift_args.h"
#include "shift_problem.h"
#include "tokenmix/checks.h"

namespace tokenmix {
namespace shift {
namespace {

using namespace cpu;

enum class Slot { kOperand, kGrad, kResult, kRow, kCount };

// Floats of one packed tile operand (it and the result tile stay in a core's L2 cache, 1 MB on
// the smallest we run on), bounded by the pixels that make a GEMM wide enough to run at speed.
// Tiles of many rows also read each channel's source in contiguous runs long enough for the
// hardware prefetcher to follow.
constexpr int64_t kTileFloats = 96 * 1024;
constexpr int64_t kMinTilePixels = 512;
constexpr int64_t kMaxTilePixels = 2048;
constexpr int64_t kTileGroup = 2;
// Weight-gradient chunks: enough to spread over the cores, few enough that their partials stay
// small next to the operands.
constexpr int64_t kMaxChunks = 32;
constexpr int64_t kPartialFloats = int64_t(1) << 20;

// ---- gather and unfold --------------------------------------------------------------------------

template <typename S>
void gather_typed(const at::Tensor& src, const TokenMap& m, at::Tensor& out) {
  const MappedRows<S> rows(m, src);
  const Strides4 os = strides_of(out);
  const S* s = src.const_data_ptr<S>();
  S* o = out.mutable_data_ptr<S>();
  const int64_t K = m.K(), GH = m.GH(), GW = m.GW();
  at::parallel_for(0, out.size(0) * K * GH, std::max<int64_t>(1, 16384 / GW), [&](int64_t r0, int64_t r1) {
    S* tmp = os.w == 1 ? nullptr : scratch<S>(Slot::kRow, GW);
    for (int64_t r = r0; r < r1;) {
      const int64_t gy = r % GH, k = (r / GH) % K, b = r / (GH * K);
      S* dst = o + b * os.b + k * os.c + gy * os.h;
      if (os.w == 1) {  // the rest of this image's channel in one run
        const int64_t run = std::min(r1 - r, GH - gy);
        rows.load_rows(s, k, b, gy, run, dst, os.h);
        r += run;
        continue;
      }
      rows.load_rows(s, k, b, gy, 1, tmp, 0);
      for (int64_t gx = 0; gx < GW; ++gx) dst[gx * os.w] = tmp[gx];
      ++r;
    }
  });
}

void gather(const at::Tensor& src, const TokenMap& m, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "shift_gather",
                                  [&] { gather_typed<scalar_t>(src, m, out); });
}

// out[b, c, i (along the axis), o] = grid at padded position fold_target(i) (+ its padded copy
// with wrap), the two copies added in the accumulation type: by whole rows where grid and output
// have contiguous columns (unrolled_row for a fold along the columns), element by element
// otherwise.
template <typename S>
void unfold_typed(const at::Tensor& grid, const TokenMap& m, at::Tensor& out) {
  using A = at::opmath_type<S>;
  const Strides4 gs = strides_of(grid), os = strides_of(out);
  const S* g = grid.const_data_ptr<S>();
  S* o = out.mutable_data_ptr<S>();
  const int64_t C = m.C, H = m.H, W = m.W;
  at::parallel_for(0, out.size(0) * C * H, std::max<int64_t>(1, 16384 / W), [&](int64_t r0, int64_t r1) {
    A* padded = scratch<A>(Slot::kRow, m.Lp);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H, c = (r / H) % C, b = r / (H * C);
      S* dst = o + b * os.b + c * os.c + h * os.h;
      if (m.axis == 3 && gs.w == 1 && os.w == 1) {
        unrolled_row(m, g + b * gs.b + c * m.p * gs.c + h * gs.h, gs.c, padded, dst);
        continue;
      }
      if (m.axis == 2 && gs.w == 1 && os.w == 1) {
        const int64_t t = fold_target(m, h);
        const GridPos q = fold_grid_pos(m, c, t, 0);
        const S* first = g + b * gs.b + q.k * gs.c + q.gy * gs.h;
        if (m.wrap && t + m.L < m.Lp) {
          const GridPos q2 = fold_grid_pos(m, c, t + m.L, 0);
          const S* second = g + b * gs.b + q2.k * gs.c + q2.gy * gs.h;
          for (int64_t w = 0; w < W; ++w) {
            dst[w] = static_cast<S>(static_cast<A>(first[w]) + static_cast<A>(second[w]));
          }
        } else {
          std::copy(first, first + W, dst);
        }
        continue;
      }
      for (int64_t w = 0; w < W; ++w) {
        const int64_t i = m.axis == 2 ? h : w, other = m.axis == 2 ? w : h;
        const int64_t t = fold_target(m, i);
        GridPos q = fold_grid_pos(m, c, t, other);
        A v = static_cast<A>(g[b * gs.b + q.k * gs.c + q.gy * gs.h + q.gx * gs.w]);
        if (m.wrap && t + m.L < m.Lp) {
          q = fold_grid_pos(m, c, t + m.L, other);
          v += static_cast<A>(g[b * gs.b + q.k * gs.c + q.gy * gs.h + q.gx * gs.w]);
        }
        dst[w * os.w] = static_cast<S>(v);
      }
    }
  });
}

void unfold(const at::Tensor& grid, const TokenMap& m, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(), "shift_unfold",
                                  [&] { unfold_typed<scalar_t>(grid, m, out); });
}

// ---- projections --------------------------------------------------------------------------------

// Tiles: ranges of whole grid rows, the rows of all images in a row (row r is row r % GH of image
// r / GH), about `pixels` pixels each, so that small maps (Hire-MLP's later stages) still give
// GEMMs wide enough to be efficient. Fixed by the shape alone, never by the thread count: the
// GEMMs' results, and the weight gradients' order of summation, do not depend on it.
struct Tiles {
  int64_t GH, GW, rows_total, rows, count;
  Tiles(int64_t B, int64_t GH_, int64_t GW_, int64_t width) : GH(GH_), GW(GW_) {
    const int64_t pixels = std::clamp<int64_t>(kTileFloats / std::max<int64_t>(width, 1), kMinTilePixels,
                                               kMaxTilePixels);
    rows_total = B * GH;
    const int64_t target = std::max<int64_t>(1, pixels / std::max<int64_t>(GW, 1));
    // A multiple of kTileGroup tiles of (nearly) equal rows, so that an even number of threads
    // shares them evenly.
    count = (rows_total + target - 1) / target;
    count = std::min(rows_total, (count + kTileGroup - 1) / kTileGroup * kTileGroup);
    rows = count == 0 ? 1 : (rows_total + count - 1) / count;
    count = rows_total == 0 ? 0 : (rows_total + rows - 1) / rows;
  }
  int64_t r0(int64_t t) const { return t * rows; }
  int64_t r1(int64_t t) const { return std::min(rows_total, r0(t) + rows); }
};

// Packs grid rows [r0, r1) (across images), channels [0, K), as a [K, (r1 - r0) * GW] matrix
// whose rows lie ld apart.
template <typename S, typename A>
void pack(const MappedRows<S>& rows, const S* src, int64_t r0, int64_t r1, A* buf, int64_t ld) {
  const int64_t GW = rows.n, GH = rows.GH;
  const TokenMap& m = rows.m;
  if (m.kind == MapKind::Fold && m.axis == 3 && rows.st.w == 1) {
    const int64_t p = m.p;
    A* padded = scratch<A>(Slot::kRow, m.Lp);
    for (int64_t c = 0; c < m.C; ++c) {
      for (int64_t r = r0; r < r1; ++r) {
        rolled_row(m, src + (r / GH) * rows.st.b + c * rows.st.c + (r % GH) * rows.st.h, padded);
        A* dst = buf + c * p * ld + (r - r0) * GW;
        for (int64_t g = 0; g < GW; ++g) {
          for (int64_t kk = 0; kk < p; ++kk) dst[kk * ld + g] = padded[g * p + kk];
        }
      }
    }
    return;
  }
  for (int64_t k = 0; k < m.K(); ++k) rows.load_rows(src, k, r0 / GH, r0 % GH, r1 - r0, buf + k * ld, GW);
}

// Stores a [J, (r1 - r0) * GW] tile (J = the map's grid channels, rows ld apart) through the map
// `rows` (rows.store_rows per channel run), or, for an unfold along the columns of an output with
// contiguous columns, by whole output rows (unrolled_row).
template <typename S, typename A>
void store_tile(const MappedRows<S>& rows, const A* tile, int64_t ld, int64_t r0, int64_t r1, S* out) {
  const int64_t GW = rows.n, GH = rows.GH;
  const TokenMap& m = rows.m;
  if (m.kind == MapKind::Fold && m.axis == 3 && rows.st.w == 1) {
    A* padded = scratch<A>(Slot::kRow, m.Lp);
    for (int64_t c = 0; c < m.C; ++c) {
      for (int64_t r = r0; r < r1; ++r) {
        unrolled_row(m, tile + c * m.p * ld + (r - r0) * GW, ld, padded,
                     out + (r / GH) * rows.st.b + c * rows.st.c + (r % GH) * rows.st.h);
      }
    }
    return;
  }
  for (int64_t j = 0; j < m.K(); ++j) rows.store_rows(tile + j * ld, GW, j, r0 / GH, r0 % GH, r1 - r0, out);
}

// Leading dimension of a packed tile of n pixels: room for one vector past n (a projection computes
// its last partial vector whole), and an odd number of cache lines, so that the K rows of a
// column panel spread over the L1 sets instead of sharing a few.
template <typename A>
int64_t operand_ld(int64_t n) {
  constexpr int64_t V = Vec<A>::size(), L = 64 / sizeof(A);
  int64_t ld = (n + V + L - 1) / L * L;
  if ((ld / L) % 2 == 0) ld += L;
  return ld;
}

// Rows of a's column panel (one register block wide) that one pass of the small GEMM sweeps: the
// panel, 256 bytes a row, then stays in a 48 KB L1 cache while every block of W's rows reads it.
constexpr int64_t kProjectDepth = 128;

// W [J, K] as the kernel table allows it: element (j, k) at p[j * ld + k], or at p[k * ld + j]
// when transposed (the backward's W^T, a view, read by columns at the cost of reading by rows).
template <typename A>
struct WeightView {
  const A* p;
  int64_t ld;
  bool transposed;
};

template <typename A>
WeightView<A> weight_view(const at::Tensor& w) {
  if (w.stride(1) == 1 || w.size(1) <= 1) return {w.const_data_ptr<A>(), w.stride(0), false};
  TORCH_INTERNAL_ASSERT(w.stride(0) == 1 || w.size(0) <= 1, "shift linear: no contiguous weight dimension");
  return {w.const_data_ptr<A>(), w.stride(1), true};
}

// dst[j, c] = bias[j] + sum over k, in order, of w[j, k] a[k, c], for j < J, c < ncols rounded up
// to whole vectors (a's rows hold zeros there and dst's rows room for them): a tile's projection
// as the register-blocked small GEMM (rows of W broadcast, pixels across the vector lanes). The
// vectors are dealt evenly to column panels of at most kSmallCols (9 as 3 + 3 + 3, not
// 4 + 4 + 1, whose last panel would reload W's rows for one vector of sums); each panel runs in
// passes over kProjectDepth rows of a that start from the last pass's sums (stored exactly, so
// the order of summation is that of one pass).
template <typename A>
void project(int64_t J, int64_t K, int64_t ncols, const WeightView<A>& w, const A* bias, const A* a,
             int64_t lda, A* dst, int64_t ldd) {
  constexpr int64_t V = Vec<A>::size();
  const int64_t nv = (ncols + V - 1) / V, panels = (nv + kSmallCols - 1) / kSmallCols;
  for (int64_t q = 0, v0 = 0; q < panels; ++q) {
    const int64_t v1 = (q + 1) * nv / panels;
    const A* b = a + v0 * V;
    A* c = dst + v0 * V;
    int64_t k0 = 0;
    do {  // once at least: K = 0 leaves the bias
      const InitRows<A> init = k0 == 0 ? InitRows<A>{bias, 1, true} : InitRows<A>{c, ldd};
      const int64_t n = (v1 - v0) * V, depth = std::min(kProjectDepth, K - k0);
      if (w.transposed) {
        small_gemm<A, true>(J, n, depth, w.p + k0 * w.ld, w.ld, b + k0 * lda, lda, c, ldd, init);
      } else {
        small_gemm<A, false>(J, n, depth, w.p + k0, w.ld, b + k0 * lda, lda, c, ldd, init);
      }
      k0 += kProjectDepth;
    } while (k0 < K);
    v0 = v1;
  }
}

// How a tile's result reaches an output of the identity map with the accumulation type, one image
// at a time (a tile may span images): NCHW straight from the GEMM where each image's part is whole
// vectors, else copied from scratch; channels_last transposed from scratch. Other outputs go
// through the store map.
enum class Direct { kNone, kNchw, kNhwc };

Direct direct_store(const at::Tensor& out, bool identity) {
  const int64_t J = out.size(1), GW = out.size(3);
  const auto s = out.strides();
  if (!identity) return Direct::kNone;
  if (s[3] == 1 && s[2] == GW) return Direct::kNchw;
  if (s[1] == 1 && s[3] == J && s[2] == GW * J) return Direct::kNhwc;
  return Direct::kNone;
}

// f(b, r, re) for each image b whose grid rows [r, re) lie in rows [r0, r1): a tile may span images,
// and the output is addressed one image at a time.
template <typename F>
void per_image(int64_t r0, int64_t r1, int64_t GH, F f) {
  for (int64_t r = r0; r < r1;) {
    const int64_t b = r / GH, re = std::min(r1, (b + 1) * GH);
    f(b, r, re);
    r = re;
  }
}

// Whether each image's part of grid rows [r0, r1) is whole vectors: the projection can then write
// an NCHW output straight from its registers, image by image, without a pass through scratch.
inline bool whole_vectors_per_image(int64_t r0, int64_t r1, int64_t GH, int64_t GW, int64_t V) {
  bool whole = true;
  per_image(r0, r1, GH, [&](int64_t, int64_t r, int64_t re) { whole = whole && (re - r) * GW % V == 0; });
  return whole;
}

template <typename S>
void linear_typed(const at::Tensor& src, const TokenMap& in_map, const at::Tensor& weight,
                  const at::Tensor& bias, const TokenMap& out_map, at::Tensor& out) {
  using A = at::opmath_type<S>;  // acc_scalar_type: weight and bias arrive in it
  const int64_t K = in_map.K(), J = weight.size(0);
  const Tiles tiles(src.size(0), in_map.GH(), in_map.GW(), std::max(K, J));
  const MappedRows<S> in(in_map, src);
  const MappedRows<S> store(out_map, out);
  const Direct direct = std::is_same_v<S, A> ? direct_store(out, out_map.kind == MapKind::Identity) : Direct::kNone;
  const auto os = out.strides();
  const S* s = src.const_data_ptr<S>();
  S* o = out.mutable_data_ptr<S>();
  const WeightView<A> w = weight_view<A>(weight);
  const A* bp = bias.defined() ? bias.const_data_ptr<A>() : nullptr;
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = tiles.r0(t), r1 = tiles.r1(t), n = (r1 - r0) * tiles.GW, ld = operand_ld<A>(n);
      A* abuf = scratch<A>(Slot::kOperand, K * ld);
      pack(in, s, r0, r1, abuf, ld);
      for (int64_t k = 0; k < K; ++k) std::fill(abuf + k * ld + n, abuf + (k + 1) * ld, A(0));
      if (direct == Direct::kNchw && whole_vectors_per_image(r0, r1, tiles.GH, tiles.GW, Vec<A>::size())) {
        if constexpr (std::is_same_v<S, A>) {
          per_image(r0, r1, tiles.GH, [&](int64_t b, int64_t r, int64_t re) {
            project(J, K, (re - r) * tiles.GW, w, bp, abuf + (r - r0) * tiles.GW, ld,
                    o + b * os[0] + (r % tiles.GH) * os[2], os[1]);
          });
        }
        continue;
      }
      A* rbuf = scratch<A>(Slot::kResult, J * ld);
      project(J, K, n, w, bp, abuf, ld, rbuf, ld);
      if (direct == Direct::kNchw) {
        if constexpr (std::is_same_v<S, A>) {
          per_image(r0, r1, tiles.GH, [&](int64_t b, int64_t r, int64_t re) {
            for (int64_t j = 0; j < J; ++j) {
              convert(o + b * os[0] + j * os[1] + (r % tiles.GH) * os[2], rbuf + j * ld + (r - r0) * tiles.GW,
                      (re - r) * tiles.GW);
            }
          });
        }
        continue;
      }
      if (direct == Direct::kNhwc) {
        if constexpr (std::is_same_v<S, A>) {
          per_image(r0, r1, tiles.GH, [&](int64_t b, int64_t r, int64_t re) {
            transpose<A>(rbuf + (r - r0) * tiles.GW, ld, J, (re - r) * tiles.GW,
                         o + b * os[0] + (r % tiles.GH) * os[2], J);
          });
        }
        continue;
      }
      store_tile(store, rbuf, ld, r0, r1, o);
    }
  });
}

void linear(const at::Tensor& src, const TokenMap& in_map, const at::Tensor& weight,
            const at::Tensor& bias, const TokenMap& out_map, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "shift_linear",
                                  [&] { linear_typed<scalar_t>(src, in_map, weight, bias, out_map, out); });
}

template <typename S>
void weight_grad_typed(const at::Tensor& grad, const TokenMap& g_map, const at::Tensor& src,
                       const TokenMap& a_map, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using A = at::opmath_type<S>;
  const int64_t J = g_map.K(), K = a_map.K();
  const Tiles tiles(src.size(0), a_map.GH(), a_map.GW(), std::max(K, J));
  const MappedRows<S> gr(g_map, grad), ar(a_map, src);
  const S* g = grad.const_data_ptr<S>();
  const S* s = src.const_data_ptr<S>();
  grad_bias.zero_();
  if (tiles.count == 0 || J == 0) {  // no pixel, or nothing to compute
    grad_weight.zero_();
    return;
  }
  // Partials of at most kPartialFloats in all (a wide weight gets fewer chunks); a chunk's first
  // tile overwrites its weight partial, which therefore needs no zeroing (the bias partials are
  // sums). Chunk 0 sums into the gradients themselves.
  const int64_t chunks =
      std::min({tiles.count, kMaxChunks, std::max<int64_t>(1, kPartialFloats / std::max<int64_t>(J * K, 1))});
  at::Tensor pw = at::empty({chunks - 1, J, K}, grad_weight.options());
  at::Tensor pb = at::zeros({chunks - 1, J}, grad_bias.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      at::Tensor w = c == 0 ? grad_weight : pw[c - 1];
      A* bsum = c == 0 ? grad_bias.mutable_data_ptr<A>() : pb[c - 1].mutable_data_ptr<A>();
      const int64_t first = c * tiles.count / chunks;
      for (int64_t t = first; t < (c + 1) * tiles.count / chunks; ++t) {
        const int64_t r0 = tiles.r0(t), r1 = tiles.r1(t), n = (r1 - r0) * tiles.GW;
        A* gbuf = scratch<A>(Slot::kGrad, J * n);
        A* abuf = scratch<A>(Slot::kOperand, K * n);
        pack(gr, g, r0, r1, gbuf, n);
        pack(ar, s, r0, r1, abuf, n);
        if (t == first) {
          at::mm_out(w, blob(gbuf, {J, n}), blob(abuf, {K, n}).t());
        } else {
          w.addmm_(blob(gbuf, {J, n}), blob(abuf, {K, n}).t());
        }
        for (int64_t j = 0; j < J; ++j) {
          bsum[j] += at::vec::reduce_all<A>([](const Vec<A>& x, const Vec<A>& y) { return x + y; },
                                            gbuf + j * n, n);
        }
      }
    }
  });
  for (int64_t c = 0; c + 1 < chunks; ++c) {
    grad_weight.add_(pw[c]);
    grad_bias.add_(pb[c]);
  }
}

void weight_grad(const at::Tensor& grad, const TokenMap& g_map, const at::Tensor& src,
                 const TokenMap& a_map, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "shift_weight_grad",
                                  [&] { weight_grad_typed<scalar_t>(grad, g_map, src, a_map, grad_weight, grad_bias); });
}

}  // namespace

TM_DEFINE_KERNELS(TM_CPU_KERNELS(shift), &gather, &unfold, &linear, &weight_grad)

}  // namespace shift
}  // namespace tokenmix
