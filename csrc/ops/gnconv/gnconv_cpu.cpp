// CPU kernels of HorNet's recursive gated convolution (gnConv).
//
// Work is split into tiles: bands of whole rows of one image, about kTilePixels pixels each,
// fixed by the shape so that per-tile partial sums, added in tile order, make every result
// independent of the thread count. Inside a tile everything is channels-last rows [pixel, channel]
// in the accumulation type.
//
// Forward, two passes over tiles:
//   A. F = x W_in^T + b_in for the tile's pixels (one GEMM; x is read in place in NCHW or NHWC).
//      The depthwise conv of the next pass reads k/2 rows of F above and below its tile, so F is
//      the one full-size intermediate.
//   B. depthwise k x k conv of F's gate channels + bias, times the scale, then the first gate
//      (p0 * g_0), all while the band is in cache; each pws step is a small GEMM whose output is
//      gated (+ bias, * g_i) in place before it leaves cache; proj_out's GEMM writes the output
//      tile in x's memory format.
// Backward saves nothing but the operands: pass A recomputes F, pass B recomputes the tile's gates
// and chain and runs it backwards (weight-gradient partials per tile, the gate gradient dD and
// dL/dp0 into full-size buffers), pass C turns dD into dL/dq (the depthwise conv with the flipped
// kernel), the depthwise weight/bias gradients, and then grad_x = dF W_in and W_in's gradient per
// tile.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "gnconv_cpu.h"
#include "tokenmix/checks.h"

namespace tokenmix {
namespace gnconv {
namespace {

constexpr int64_t kTilePixels = 512;
constexpr int64_t kStrip = 8;  // output pixels per register block of the depthwise conv

template <typename A>
using Vec = at::vec::Vectorized<A>;

// Bands of rows of one image; tile t covers image t / bands, rows [y0, y1).
struct Tiling {
  int64_t B, H, W, HW, rows, bands, count;

  Tiling(int64_t B_, const DwGeometry& g)
      : B(B_), H(g.H), W(g.W), HW(g.H * g.W),
        rows(std::clamp<int64_t>(kTilePixels / std::max<int64_t>(g.W, 1), 1, std::max<int64_t>(g.H, 1))),
        bands((g.H + rows - 1) / rows), count(B_ * bands) {}
  int64_t image(int64_t t) const { return t / bands; }
  int64_t y0(int64_t t) const { return (t % bands) * rows; }
  int64_t y1(int64_t t) const { return std::min(H, y0(t) + rows); }
  int64_t max_pixels() const { return rows * W; }
};

template <typename A>
at::Tensor blob(A* p, at::IntArrayRef sizes) {
  return at::from_blob(p, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

// ---- vectorised row helpers -------------------------------------------------------------------

// dst[r, :n] = op(a[r, :n], b[r, :n]) for r < rows; op takes (and returns) Vec<A> or A.
template <typename A, typename Op>
void rowwise(int64_t rows, int64_t n, A* dst, int64_t ldd, const A* a, int64_t lda, const A* b,
             int64_t ldb, const Op& op) {
  constexpr int64_t V = Vec<A>::size();
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * ldd;
    const A* pa = a + r * lda;
    const A* pb = b + r * ldb;
    int64_t c = 0;
    for (; c + V <= n; c += V) op(Vec<A>::loadu(pa + c), Vec<A>::loadu(pb + c)).store(d + c);
    for (; c < n; ++c) d[c] = op(pa[c], pb[c]);
  }
}

// z[r, :n] = (z[r, :n] + bias[:n]) * g[r, :n]: a pws step's epilogue, in place.
template <typename A>
void bias_gate(int64_t rows, int64_t n, A* z, const A* bias, const A* g, int64_t ldg) {
  constexpr int64_t V = Vec<A>::size();
  for (int64_t r = 0; r < rows; ++r) {
    A* d = z + r * n;
    const A* pg = g + r * ldg;
    int64_t c = 0;
    for (; c + V <= n; c += V) {
      ((Vec<A>::loadu(d + c) + Vec<A>::loadu(bias + c)) * Vec<A>::loadu(pg + c)).store(d + c);
    }
    for (; c < n; ++c) d[c] = (d[c] + bias[c]) * pg[c];
  }
}

// sum[:n] (+)= column sums of src[rows, :n], rows in order.
template <typename A>
void column_sums(int64_t rows, int64_t n, const A* src, int64_t ld, A* sum) {
  std::fill(sum, sum + n, A(0));
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::map2<A>([](Vec<A> s, Vec<A> v) { return s + v; }, sum, sum, src + r * ld, n);
  }
}

// Tile [np, C] (accumulation type) <-> tensor rows of image pixels in NCHW or NHWC: element
// (pixel, c) at base + pixel * ps + c * cs.
template <typename scalar_t, typename A>
void store_tile(const A* src, int64_t np, int64_t C, const A* bias, scalar_t* base, int64_t ps,
                int64_t cs) {
  if (cs == 1) {
    for (int64_t i = 0; i < np; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        base[i * ps + c] = static_cast<scalar_t>(src[i * C + c] + (bias ? bias[c] : A(0)));
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const A add = bias ? bias[c] : A(0);
      for (int64_t i = 0; i < np; ++i) base[c * cs + i * ps] = static_cast<scalar_t>(src[i * C + c] + add);
    }
  }
}

template <typename scalar_t, typename A>
void load_tile(const scalar_t* base, int64_t ps, int64_t cs, int64_t np, int64_t C, A* dst) {
  if (cs == 1) {
    for (int64_t i = 0; i < np; ++i) {
      for (int64_t c = 0; c < C; ++c) dst[i * C + c] = static_cast<A>(base[i * ps + c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < np; ++i) dst[i * C + c] = static_cast<A>(base[c * cs + i * ps]);
    }
  }
}

// ---- depthwise convolution ----------------------------------------------------------------------

// One block of channels [c, c + n) of kStrip consecutive output pixels starting at (y, x0), every
// tap inside the map in x (the caller guarantees it); rows outside the map are skipped.
template <typename A, bool kFull>
inline void depthwise_strip(const A* src, int64_t ld_src, const A* w, int64_t S, const DwGeometry& g,
                            int64_t k, int64_t y, int64_t x0, int64_t c, int64_t n, const Vec<A>& init,
                            A scale, A* dst, int64_t ld_dst) {
  const auto load = [n](const A* ptr) { return kFull ? Vec<A>::loadu(ptr) : Vec<A>::loadu(ptr, n); };
  const int64_t pad = k / 2;
  Vec<A> acc[kStrip];
#pragma GCC unroll 8
  for (int64_t j = 0; j < kStrip; ++j) acc[j] = init;
  for (int64_t ky = g.tap_lo(y); ky < g.tap_hi(y, g.H); ++ky) {
    const A* row = src + ((y + ky - pad) * g.W + x0 - pad) * ld_src + c;
    for (int64_t kx = 0; kx < k; ++kx) {
      const Vec<A> wv = load(w + (ky * k + kx) * S + c);
#pragma GCC unroll 8
      for (int64_t j = 0; j < kStrip; ++j) acc[j] = at::vec::fmadd(load(row + (j + kx) * ld_src), wv, acc[j]);
    }
  }
  const Vec<A> vs(scale);
#pragma GCC unroll 8
  for (int64_t j = 0; j < kStrip; ++j) {
    const Vec<A> r = acc[j] * vs;
    if (kFull) {
      r.store(dst + j * ld_dst + c);
    } else {
      r.store(dst + j * ld_dst + c, n);
    }
  }
}

// Any single output pixel (y, x), all channels, border taps skipped.
template <typename A>
void depthwise_pixel(const A* src, int64_t ld_src, const A* w, const A* bias, A scale, int64_t S,
                     const DwGeometry& g, int64_t y, int64_t x, A* out) {
  const int64_t k = g.k, pad = g.pad();
  for (int64_t c = 0; c < S; ++c) out[c] = bias ? bias[c] : A(0);
  for (int64_t ky = g.tap_lo(y); ky < g.tap_hi(y, g.H); ++ky) {
    for (int64_t kx = g.tap_lo(x); kx < g.tap_hi(x, g.W); ++kx) {
      const A* in = src + ((y + ky - pad) * g.W + x + kx - pad) * ld_src;
      at::vec::map3<A>([](Vec<A> o, Vec<A> a, Vec<A> b) { return at::vec::fmadd(a, b, o); }, out,
                       out, in, w + (ky * k + kx) * S, S);
    }
  }
  at::vec::map<A>([scale](Vec<A> v) { return v * Vec<A>(scale); }, out, out, S);
}

// dst[pixel, c] = scale * (bias[c] + sum_t w[t, c] src[pixel + o_t, c]), c < S, for the pixels of
// rows [y0, y1) of one image (zeros outside the map). src: the image's pixel 0, ld_src apart;
// w: [k * k, S] tap-major; bias may be null; dst: pixel (y0, 0), ld_dst apart.
template <typename A>
void depthwise_impl(const A* src, int64_t ld_src, const A* w, const A* bias, A scale, int64_t S,
                    const DwGeometry& g, int64_t k, int64_t y0, int64_t y1, A* dst, int64_t ld_dst) {
  constexpr int64_t V = Vec<A>::size();
  const int64_t pad = k / 2;
  for (int64_t y = y0; y < y1; ++y) {
    A* drow = dst + (y - y0) * g.W * ld_dst;
    int64_t x = 0;
    for (; x < std::min(pad, g.W); ++x) depthwise_pixel(src, ld_src, w, bias, scale, S, g, y, x, drow + x * ld_dst);
    for (; x + kStrip + pad <= g.W; x += kStrip) {
      int64_t c = 0;
      for (; c + V <= S; c += V) {
        const Vec<A> init = bias ? Vec<A>::loadu(bias + c) : Vec<A>(A(0));
        depthwise_strip<A, true>(src, ld_src, w, S, g, k, y, x, c, V, init, scale, drow + x * ld_dst, ld_dst);
      }
      if (c < S) {
        const Vec<A> init = bias ? Vec<A>::loadu(bias + c, S - c) : Vec<A>(A(0));
        depthwise_strip<A, false>(src, ld_src, w, S, g, k, y, x, c, S - c, init, scale, drow + x * ld_dst, ld_dst);
      }
    }
    for (; x < g.W; ++x) depthwise_pixel(src, ld_src, w, bias, scale, S, g, y, x, drow + x * ld_dst);
  }
}

// The kernel size as a compile-time constant for the common sizes, so tap loops unroll.
template <typename A>
void depthwise(const A* src, int64_t ld_src, const A* w, const A* bias, A scale, int64_t S,
               const DwGeometry& g, int64_t y0, int64_t y1, A* dst, int64_t ld_dst) {
  switch (g.k) {
    case 7: return depthwise_impl(src, ld_src, w, bias, scale, S, g, 7, y0, y1, dst, ld_dst);
    case 5: return depthwise_impl(src, ld_src, w, bias, scale, S, g, 5, y0, y1, dst, ld_dst);
    case 3: return depthwise_impl(src, ld_src, w, bias, scale, S, g, 3, y0, y1, dst, ld_dst);
    default: return depthwise_impl(src, ld_src, w, bias, scale, S, g, g.k, y0, y1, dst, ld_dst);
  }
}

// gw[t, c] += sum over pixels p of rows [y0, y1): dy[p, c] * src[p + o_t, c] (zero outside the
// map). dy: pixel (y0, 0), ld_dy apart; src: the image's pixel 0, ld_src apart; gw [k * k, S].
// For one kernel row, the k taps' sums stay in registers while x runs along the row.
template <typename A>
void depthwise_weight_grad(const A* src, int64_t ld_src, const A* dy, int64_t ld_dy, int64_t S,
                           const DwGeometry& g, int64_t y0, int64_t y1, A* gw) {
  constexpr int64_t V = Vec<A>::size();
  const int64_t k = g.k, pad = g.pad();
  std::vector<Vec<A>> acc(k);
  for (int64_t y = y0; y < y1; ++y) {
    const A* dyrow = dy + (y - y0) * g.W * ld_dy;
    for (int64_t ky = g.tap_lo(y); ky < g.tap_hi(y, g.H); ++ky) {
      const A* srow = src + (y + ky - pad) * g.W * ld_src;
      for (int64_t c = 0; c < S; c += V) {
        const int64_t n = std::min(V, S - c);
        for (auto& a : acc) a = Vec<A>(A(0));
        for (int64_t x = 0; x < g.W; ++x) {
          const Vec<A> d = Vec<A>::loadu(dyrow + x * ld_dy + c, n);
          const int64_t lo = g.tap_lo(x), hi = g.tap_hi(x, g.W);
          for (int64_t kx = lo; kx < hi; ++kx) {
            acc[kx] = at::vec::fmadd(d, Vec<A>::loadu(srow + (x + kx - pad) * ld_src + c, n), acc[kx]);
          }
        }
        for (int64_t kx = 0; kx < k; ++kx) {
          A* dst = gw + (ky * k + kx) * S + c;
          (Vec<A>::loadu(dst, n) + acc[kx]).store(dst, n);
        }
      }
    }
  }
}

// ---- the op -----------------------------------------------------------------------------------

// Weights in the accumulation type and the layouts the kernels read.
struct Weights {
  at::Tensor w_in, b_in, w_dw, b_dw, w_out, b_out;  // w_dw: [k * k, S] tap-major
  std::vector<at::Tensor> w_pw, b_pw;               // w_*: [out, in]

  // Detached: the worker threads of at::parallel_for do not inherit the caller's
  // below-autograd dispatch state, and out= GEMMs refuse operands that require grad.
  Weights(const Problem& p, at::ScalarType acc) {
    const auto vec = [acc](const at::Tensor& b) { return b.detach().to(acc); };
    const auto mat = [&](const at::Tensor& w) { return vec(w).view({w.size(0), w.size(1)}); };
    w_in = mat(p.w_in);
    w_out = mat(p.w_out);
    b_in = vec(p.b_in);
    b_out = vec(p.b_out);
    b_dw = vec(p.b_dw);
    w_dw = vec(p.w_dw).view({p.lay.S, -1}).t().contiguous();
    for (size_t i = 0; i < p.w_pw.size(); ++i) {
      w_pw.push_back(mat(p.w_pw[i]));
      b_pw.push_back(vec(p.b_pw[i]));
    }
  }
  // The depthwise kernel rotated by 180 degrees, tap-major: backward's transposed convolution.
  at::Tensor w_dw_flipped(const Problem& p) const {
    return w_dw.t().reshape({p.lay.S, p.geo.k, p.geo.k}).flip({1, 2}).reshape({p.lay.S, -1}).t().contiguous();
  }
};

// Per-call views shared by the passes.
template <typename scalar_t>
struct Call {
  using A = at::opmath_type<scalar_t>;
  const Problem& p;
  const Layout& L;
  const DwGeometry& g;
  Tiling tiles;
  Weights w;
  at::Tensor xa;  // x in the accumulation type, x's memory format
  at::Tensor F;   // [B * H * W, 2 dim]
  int64_t P2;     // 2 dim

  explicit Call(const Problem& p_)
      : p(p_), L(p_.lay), g(p_.geo), tiles(p_.x.size(0), p_.geo),
        w(p_, acc_scalar_type(p_.x.scalar_type())),
        xa(p_.x.detach().to(acc_scalar_type(p_.x.scalar_type()))),
        P2(p_.lay.proj_width()) {
    F = at::empty({tiles.B * tiles.HW, P2}, xa.options().memory_format(at::MemoryFormat::Contiguous));
  }

  // x rows [pix0, pix0 + np) of image b as an [np, dim] matrix (a transposed view for NCHW).
  at::Tensor x_rows(int64_t b, int64_t pix0, int64_t np) const {
    return xa[b].flatten(1).narrow(1, pix0, np).t();
  }
  A* F_image(int64_t b) const { return F.mutable_data_ptr<A>() + b * tiles.HW * P2; }

  // Pass A: F = x W_in^T + b_in, tile by tile.
  void project_in() {
    at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = tiles.image(t), pix0 = tiles.y0(t) * g.W, np = (tiles.y1(t) - tiles.y0(t)) * g.W;
        at::Tensor dst = blob(F_image(b) + pix0 * P2, {np, P2});
        at::addmm_out(dst, w.b_in, x_rows(b, pix0, np), w.w_in.t());
      }
    });
  }

  // The tile's gates g = scale * (dwconv(q) + b_dw), [np, S].
  void gates(int64_t t, A* gbuf) const {
    const A* Fb = F_image(tiles.image(t));
    depthwise<A>(Fb + L.dims[0], P2, w.w_dw.const_data_ptr<A>(), w.b_dw.const_data_ptr<A>(),
                 static_cast<A>(p.scale), L.S, g, tiles.y0(t), tiles.y1(t), gbuf, L.S);
  }

  // Element (pixel, c) of image b of a tensor in x's memory format: base + pixel * ps + c * cs.
  int64_t pixel_stride() const { return p.x.stride(3); }
  int64_t channel_stride() const { return p.x.stride(1); }
};

template <typename scalar_t>
void forward_typed(const Problem& p, at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;
  Call<scalar_t> call(p);
  const Layout& L = p.lay;
  const Tiling& tiles = call.tiles;
  const int64_t P2 = call.P2, C = L.dim, n = L.order;
  call.project_in();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t ps = out.stride(3), cs = out.stride(1);

  at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
    const int64_t mp = tiles.max_pixels();
    std::vector<A> gbuf(mp * L.S), ya(mp * C), yb(mp * C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tiles.image(t), pix0 = tiles.y0(t) * p.geo.W;
      const int64_t np = (tiles.y1(t) - tiles.y0(t)) * p.geo.W;
      call.gates(t, gbuf.data());
      A* y = ya.data();
      A* z = yb.data();
      rowwise<A>(np, L.dims[0], y, L.dims[0], call.F_image(b) + pix0 * P2, P2, gbuf.data(), L.S,
                 [](auto u, auto v) { return u * v; });
      for (int64_t i = 1; i < n; ++i) {
        at::Tensor zt = blob(z, {np, L.dims[i]});
        at::mm_out(zt, blob(y, {np, L.dims[i - 1]}), call.w.w_pw[i - 1].t());
        bias_gate<A>(np, L.dims[i], z, call.w.b_pw[i - 1].template const_data_ptr<A>(),
                     gbuf.data() + L.offs[i], L.S);
        std::swap(y, z);
      }
      at::Tensor ot = blob(z, {np, C});
      at::mm_out(ot, blob(y, {np, C}), call.w.w_out.t());
      store_tile<scalar_t, A>(z, np, C, call.w.b_out.template const_data_ptr<A>(),
                              o + b * out.stride(0) + pix0 * ps, ps, cs);
    }
  });
}

// Per-tile partial sums of the parameter gradients, added in tile order at the end.
template <typename A>
struct Partials {
  at::Tensor w_in, b_in, w_dw, b_dw, w_out, b_out;
  std::vector<at::Tensor> w_pw, b_pw;

  Partials(int64_t T, const Weights& w, const Layout& L) {
    const auto like = [T](const at::Tensor& t) {
      std::vector<int64_t> s{T};
      s.insert(s.end(), t.sizes().begin(), t.sizes().end());
      return at::zeros(s, t.options());
    };
    w_in = like(w.w_in);
    b_in = like(w.b_in);
    w_dw = like(w.w_dw);
    b_dw = like(w.b_dw);
    w_out = like(w.w_out);
    b_out = like(w.b_out);
    for (size_t i = 0; i < w.w_pw.size(); ++i) {
      w_pw.push_back(like(w.w_pw[i]));
      b_pw.push_back(like(w.b_pw[i]));
    }
  }
  static void reduce_into(const at::Tensor& part, at::Tensor& dst) {
    at::Tensor sum = part[0].clone();
    for (int64_t t = 1; t < part.size(0); ++t) sum.add_(part[t]);
    dst.copy_(sum.view(dst.sizes()));
  }
};

template <typename scalar_t>
void backward_typed(const Problem& p, const at::Tensor& grad, Grads& gr) {
  using A = at::opmath_type<scalar_t>;
  Call<scalar_t> call(p);
  const Layout& L = p.lay;
  const DwGeometry& g = p.geo;
  const Tiling& tiles = call.tiles;
  const int64_t P2 = call.P2, C = L.dim, n = L.order, S = L.S, d0 = L.dims[0];
  const A scale = static_cast<A>(p.scale);
  call.project_in();
  Partials<A> part(tiles.count, call.w, L);
  const at::Tensor w_dw_flip = call.w.w_dw_flipped(p);
  // dD: gradient of the gates before the scale (of dwconv(q) + b_dw), [N, S]; dF: of F, [N, 2 dim].
  at::Tensor dD = at::empty({tiles.B * tiles.HW, S}, call.F.options());
  at::Tensor dF = at::empty_like(call.F);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t ps = call.pixel_stride(), cs = call.channel_stride();

  // Pass B: recompute the tile's gates and chain, then run it backwards.
  at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
    const int64_t mp = tiles.max_pixels();
    std::vector<A> gbuf(mp * S), ys(mp * S), zs(mp * S), da(mp * C), db(mp * C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tiles.image(t), pix0 = tiles.y0(t) * g.W;
      const int64_t np = (tiles.y1(t) - tiles.y0(t)) * g.W;
      const A* Ft = call.F_image(b) + pix0 * P2;
      A* dDt = dD.mutable_data_ptr<A>() + (b * tiles.HW + pix0) * S;
      A* dFt = dF.mutable_data_ptr<A>() + (b * tiles.HW + pix0) * P2;
      call.gates(t, gbuf.data());
      // y_i at ys + np * offs[i], pre-gate z_i (bias included) at zs + np * offs[i].
      const auto Y = [&](int64_t i) { return ys.data() + np * L.offs[i]; };
      const auto Z = [&](int64_t i) { return zs.data() + np * L.offs[i]; };
      rowwise<A>(np, d0, Y(0), d0, Ft, P2, gbuf.data(), S, [](auto u, auto v) { return u * v; });
      for (int64_t i = 1; i < n; ++i) {
        at::Tensor zt = blob(Z(i), {np, L.dims[i]});
        at::addmm_out(zt, call.w.b_pw[i - 1], blob(Y(i - 1), {np, L.dims[i - 1]}), call.w.w_pw[i - 1].t());
        rowwise<A>(np, L.dims[i], Y(i), L.dims[i], Z(i), L.dims[i], gbuf.data() + L.offs[i], S,
                   [](auto u, auto v) { return u * v; });
      }
      // proj_out
      load_tile<scalar_t, A>(gp + b * grad.stride(0) + pix0 * ps, ps, cs, np, C, da.data());
      const at::Tensor dO = blob(da.data(), {np, C});
      at::Tensor gwo = part.w_out[t];
      at::mm_out(gwo, dO.t(), blob(Y(n - 1), {np, C}));
      column_sums<A>(np, C, da.data(), C, part.b_out[t].template mutable_data_ptr<A>());
      A* dy = db.data();
      A* spare = da.data();
      at::Tensor dyt = blob(dy, {np, C});
      at::mm_out(dyt, dO, call.w.w_out);
      // pws steps, last first: dg_i = dy * z_i, dz_i = dy * g_i, dy_{i-1} = dz_i W_i.
      for (int64_t i = n - 1; i >= 1; --i) {
        const int64_t di = L.dims[i], dp = L.dims[i - 1];
        rowwise<A>(np, di, dDt + L.offs[i], S, dy, di, Z(i), di,
                   [scale](auto u, auto v) { return u * v * decltype(u)(scale); });
        rowwise<A>(np, di, dy, di, dy, di, gbuf.data() + L.offs[i], S, [](auto u, auto v) { return u * v; });
        const at::Tensor dz = blob(dy, {np, di});
        at::Tensor gwi = part.w_pw[i - 1][t];
        at::mm_out(gwi, dz.t(), blob(Y(i - 1), {np, dp}));
        column_sums<A>(np, di, dy, di, part.b_pw[i - 1][t].template mutable_data_ptr<A>());
        at::Tensor nxt = blob(spare, {np, dp});
        at::mm_out(nxt, dz, call.w.w_pw[i - 1]);
        std::swap(dy, spare);
      }
      // first gate: y_0 = p0 * g_0
      rowwise<A>(np, d0, dDt, S, dy, d0, Ft, P2, [scale](auto u, auto v) { return u * v * decltype(u)(scale); });
      rowwise<A>(np, d0, dFt, P2, dy, d0, gbuf.data(), S, [](auto u, auto v) { return u * v; });
    }
  });

  // Pass C: dL/dq, the depthwise and proj_in parameter gradients, grad_x.
  scalar_t* gx = gr.x.mutable_data_ptr<scalar_t>();
  const int64_t gps = gr.x.stride(3), gcs = gr.x.stride(1);
  at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> dx(tiles.max_pixels() * C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = tiles.image(t), y0 = tiles.y0(t), y1 = tiles.y1(t);
      const int64_t pix0 = y0 * g.W, np = (y1 - y0) * g.W;
      const A* dDb = dD.const_data_ptr<A>() + b * tiles.HW * S;
      A* dFt = dF.mutable_data_ptr<A>() + (b * tiles.HW + pix0) * P2;
      depthwise<A>(dDb, S, w_dw_flip.const_data_ptr<A>(), nullptr, A(1), S, g, y0, y1, dFt + d0, P2);
      depthwise_weight_grad<A>(call.F_image(b) + d0, P2, dDb + pix0 * S, S, S, g, y0, y1,
                               part.w_dw[t].template mutable_data_ptr<A>());
      column_sums<A>(np, S, dDb + pix0 * S, S, part.b_dw[t].template mutable_data_ptr<A>());
      column_sums<A>(np, P2, dFt, P2, part.b_in[t].template mutable_data_ptr<A>());
      const at::Tensor dFm = blob(dFt, {np, P2});
      at::Tensor gwi = part.w_in[t];
      at::mm_out(gwi, dFm.t(), call.x_rows(b, pix0, np));
      at::Tensor dxt = blob(dx.data(), {np, C});
      at::mm_out(dxt, dFm, call.w.w_in);
      store_tile<scalar_t, A>(dx.data(), np, C, nullptr, gx + b * gr.x.stride(0) + pix0 * gps, gps, gcs);
    }
  });

  using P = Partials<A>;
  P::reduce_into(part.w_in, gr.w_in);
  P::reduce_into(part.b_in, gr.b_in);
  // [T, k * k, S] tap-major -> [S, 1, k, k]
  at::Tensor gdw = at::empty({S, g.taps()}, call.F.options());
  P::reduce_into(part.w_dw.transpose(1, 2), gdw);
  gr.w_dw.copy_(gdw.view(gr.w_dw.sizes()));
  P::reduce_into(part.b_dw, gr.b_dw);
  P::reduce_into(part.w_out, gr.w_out);
  P::reduce_into(part.b_out, gr.b_out);
  for (int64_t i = 0; i + 1 < n; ++i) {
    P::reduce_into(part.w_pw[i], gr.w_pw[i]);
    P::reduce_into(part.b_pw[i], gr.b_pw[i]);
  }
}

void forward(const Problem& p, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "gnconv",
                                  [&] { forward_typed<scalar_t>(p, out); });
}

void backward(const Problem& p, const at::Tensor& grad, Grads& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "gnconv_backward",
                                  [&] { backward_typed<scalar_t>(p, grad, g); });
}

}  // namespace

const CpuKernels& TM_CPU_KERNELS(gnconv)() {
  static const CpuKernels kernels{&forward, &backward};
  return kernels;
}

}  // namespace gnconv
}  // namespace tokenmix
