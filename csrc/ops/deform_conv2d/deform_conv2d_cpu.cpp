// CPU kernels of deformable convolution (DCNv1/v2, torchvision.ops.deform_conv2d semantics).
//
// Forward fuses bilinear sampling with the channel-mixing GEMM tile by tile: the input is read
// channels-last, each tile of kTile output pixels samples its [kTile, kk * Cin] columns into a
// task-local buffer (vectorised over channels, taps outside the map skipped), and one small GEMM
// per weight group turns the tile into outputs while it is still in cache. No full-size column
// buffer exists. Kernel == stride, padding 0 (LIT's token merging) needs no special case: every
// tap of the tile is one contiguous channel run.
//
// Backward runs one task per image, so the scatter of input gradients needs no atomics and the
// result does not depend on the thread count: per tile, columns are resampled, grad_columns =
// grad_out W, weight/bias gradients accumulate per image (summed over images in order afterwards),
// and each sample's channel loop yields its offset and mask gradients and scatters its input
// gradient to the four neighbours, as torchvision's kernels define them.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "deform_conv2d_problem.h"
#include "tokenmix/checks.h"

namespace tokenmix {
namespace deform_conv2d {
namespace {

constexpr int64_t kTile = 64;  // output pixels per GEMM tile

template <typename A>
using Vec = at::vec::Vectorized<A>;

struct Dims {
  int64_t B, Cin, Cout, groups, Cin_g, Cout_g, G, Cg, kk, Kg, HW, P, tiles;

  explicit Dims(const Problem& p)
      : B(p.input.size(0)),
        Cin(p.input.size(1)),
        Cout(p.weight.size(0)),
        groups(p.groups),
        Cin_g(p.weight.size(1)),
        Cout_g(p.weight.size(0) / p.groups),
        G(p.offset_groups),
        Cg(p.input.size(1) / p.offset_groups),
        kk(p.geo.taps()),
        Kg(p.geo.taps() * p.weight.size(1)),
        HW(p.geo.H * p.geo.W),
        P(p.geo.Ho * p.geo.Wo),
        tiles((p.geo.Ho * p.geo.Wo + kTile - 1) / kTile) {}
};

// Column buffers are [groups][kTile][Kg]: weight group, pixel, then tap-major (tap, channel).
inline int64_t col_offset(const Dims& d, int64_t pixel, int64_t c, int64_t t) {
  const int64_t gw = c / d.Cin_g;
  return (gw * kTile + pixel) * d.Kg + t * d.Cin_g + (c - gw * d.Cin_g);
}

// dst[0, n) (+)= w * src[0, n)
template <typename scalar_t, typename A>
void axpy(A* dst, const scalar_t* src, A w, int64_t n, bool first) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, A>) {
    constexpr int64_t W = Vec<A>::size();
    const Vec<A> vw(w);
    for (; j + W <= n; j += W) {
      const Vec<A> v = Vec<A>::loadu(src + j) * vw;
      (first ? v : v + Vec<A>::loadu(dst + j)).store(dst + j);
    }
  }
  for (; j < n; ++j) {
    const A v = static_cast<A>(src[j]) * w;
    dst[j] = first ? v : dst[j] + v;
  }
}

// Per-call pointers and derived values shared by forward and backward.
template <typename scalar_t, typename A>
struct Sampler {
  const Problem& p;
  const Dims& d;
  const scalar_t* x_cl;  // [B, H, W, Cin]
  const scalar_t* off;
  const scalar_t* msk;

  // Sample position, modulation and neighbours of tap t of offset group go at output pixel pix.
  void position(int64_t b, int64_t go, int64_t t, int64_t pix, A* y, A* x, A* m) const {
    const Geometry& g = p.geo;
    const int64_t ch = (b * d.G + go) * d.kk + t;
    *y = static_cast<A>(g.base_y(pix / g.Wo, t)) + static_cast<A>(off[(2 * ch) * d.P + pix]);
    *x = static_cast<A>(g.base_x(pix % g.Wo, t)) + static_cast<A>(off[(2 * ch + 1) * d.P + pix]);
    *m = msk != nullptr ? static_cast<A>(msk[ch * d.P + pix]) : A(1);
  }

  // Columns of pixels [p0, p0 + np) of image b.
  void tile(int64_t b, int64_t p0, int64_t np, A* cols) const {
    const Geometry& g = p.geo;
    for (int64_t pi = 0; pi < np; ++pi) {
      for (int64_t go = 0; go < d.G; ++go) {
        for (int64_t t = 0; t < d.kk; ++t) {
          A y, x, m;
          position(b, go, t, p0 + pi, &y, &x, &m);
          const Corners<A> cn = corners(y, x, g.H, g.W, true);
          for (int64_t c = go * d.Cg; c < (go + 1) * d.Cg;) {
            const int64_t gw = c / d.Cin_g;
            const int64_t end = std::min((go + 1) * d.Cg, (gw + 1) * d.Cin_g);
            A* dst = cols + col_offset(d, pi, c, t);
            bool first = true;
            for (int k = 0; k < 4; ++k) {
              if (!cn.valid[k]) continue;
              axpy(dst, x_cl + (b * d.HW + cn.idx[k]) * d.Cin + c, cn.w[k] * m, end - c, first);
              first = false;
            }
            if (first) std::fill(dst, dst + (end - c), A(0));
            c = end;
          }
        }
      }
    }
  }
};

// weight [Cout, Cin_g, kh, kw] -> [groups, Cout_g, kk, Cin_g] in the accumulation type.
// Detached: with one input channel per group the chain below is a no-op that returns the weight
// itself, and the at::parallel_for workers, which do not inherit the caller's grad mode, would
// then run their at::mm_out on a tensor that requires grad.
at::Tensor weight_tap_major(const Problem& p, const Dims& d) {
  return p.weight.detach()
      .to(acc_scalar_type(p.weight.scalar_type()))
      .view({d.groups, d.Cout_g, d.Cin_g, d.kk})
      .permute({0, 1, 3, 2})
      .contiguous();
}

template <typename scalar_t>
void forward_typed(const Problem& p, at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;
  const Dims d(p);
  const at::Tensor x_cl = p.input.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor w2 = weight_tap_major(p, d).view({d.groups, d.Cout_g, d.Kg});
  const at::Tensor bias = p.bias.defined() ? p.bias.to(acc_scalar_type(p.bias.scalar_type())) : at::Tensor();
  const Sampler<scalar_t, A> sampler{p, d, x_cl.const_data_ptr<scalar_t>(),
                                     p.offset.const_data_ptr<scalar_t>(),
                                     p.mask.defined() ? p.mask.const_data_ptr<scalar_t>() : nullptr};
  const A* bp = bias.defined() ? bias.const_data_ptr<A>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const auto opts = at::TensorOptions().dtype(acc_scalar_type(out.scalar_type()));

  at::parallel_for(0, d.B * d.tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> cols(d.groups * kTile * d.Kg), tile_out(d.groups * kTile * d.Cout_g);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.tiles, p0 = (task % d.tiles) * kTile;
      const int64_t np = std::min(kTile, d.P - p0);
      sampler.tile(b, p0, np, cols.data());
      for (int64_t gw = 0; gw < d.groups; ++gw) {
        at::Tensor c = at::from_blob(cols.data() + gw * kTile * d.Kg, {np, d.Kg}, opts);
        at::Tensor r = at::from_blob(tile_out.data() + gw * kTile * d.Cout_g, {np, d.Cout_g}, opts);
        at::mm_out(r, c, w2[gw].t());
      }
      for (int64_t co = 0; co < d.Cout; ++co) {
        const int64_t gw = co / d.Cout_g;
        const A* src = tile_out.data() + gw * kTile * d.Cout_g + (co - gw * d.Cout_g);
        const A add = bp != nullptr ? bp[co] : A(0);
        scalar_t* dst = o + (b * d.Cout + co) * d.P + p0;
        for (int64_t pi = 0; pi < np; ++pi) dst[pi] = static_cast<scalar_t>(src[pi * d.Cout_g] + add);
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const Problem& p, const at::Tensor& grad, at::Tensor& grad_input,
                    at::Tensor& grad_offset, at::Tensor& grad_weight, at::Tensor& grad_bias,
                    at::Tensor& grad_mask) {
  using A = at::opmath_type<scalar_t>;
  const Dims d(p);
  const Geometry& g = p.geo;
  const at::Tensor x_cl = p.input.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor w2 = weight_tap_major(p, d).view({d.groups, d.Cout_g, d.Kg});
  const auto opts = at::TensorOptions().dtype(acc_scalar_type(grad.scalar_type()));
  // Per-image partial gradients of the weight and bias, summed in image order below.
  at::Tensor gw_part = at::zeros({d.B, d.groups, d.Cout_g, d.Kg}, opts);
  at::Tensor gb_part = at::zeros({d.B, d.Cout}, opts);
  const scalar_t* xp = x_cl.const_data_ptr<scalar_t>();
  const Sampler<scalar_t, A> sampler{p, d, xp, p.offset.const_data_ptr<scalar_t>(),
                                     p.mask.defined() ? p.mask.const_data_ptr<scalar_t>() : nullptr};
  const scalar_t* go_p = grad.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  scalar_t* goff = grad_offset.mutable_data_ptr<scalar_t>();
  scalar_t* gmask = grad_mask.defined() ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> cols(d.groups * kTile * d.Kg), gcols(d.groups * kTile * d.Kg);
    std::vector<A> gout(d.groups * kTile * d.Cout_g), gx(d.HW * d.Cin);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(gx.begin(), gx.end(), A(0));
      A* gbias = gb_part[b].mutable_data_ptr<A>();
      for (int64_t tix = 0; tix < d.tiles; ++tix) {
        const int64_t p0 = tix * kTile, np = std::min(kTile, d.P - p0);
        sampler.tile(b, p0, np, cols.data());
        for (int64_t co = 0; co < d.Cout; ++co) {
          const int64_t gw = co / d.Cout_g;
          A* dst = gout.data() + gw * kTile * d.Cout_g + (co - gw * d.Cout_g);
          const scalar_t* src = go_p + (b * d.Cout + co) * d.P + p0;
          A sum(0);
          for (int64_t pi = 0; pi < np; ++pi) {
            dst[pi * d.Cout_g] = static_cast<A>(src[pi]);
            sum += dst[pi * d.Cout_g];
          }
          gbias[co] += sum;
        }
        for (int64_t gw = 0; gw < d.groups; ++gw) {
          at::Tensor c = at::from_blob(cols.data() + gw * kTile * d.Kg, {np, d.Kg}, opts);
          at::Tensor gc = at::from_blob(gcols.data() + gw * kTile * d.Kg, {np, d.Kg}, opts);
          at::Tensor go = at::from_blob(gout.data() + gw * kTile * d.Cout_g, {np, d.Cout_g}, opts);
          at::mm_out(gc, go, w2[gw]);
          gw_part[b][gw].addmm_(go.t(), c);
        }
        for (int64_t pi = 0; pi < np; ++pi) {
          const int64_t pix = p0 + pi;
          for (int64_t go = 0; go < d.G; ++go) {
            for (int64_t t = 0; t < d.kk; ++t) {
              A y, x, m;
              sampler.position(b, go, t, pix, &y, &x, &m);
              const Corners<A> cf = corners(y, x, g.H, g.W, true);
              const Corners<A> cg = corners(y, x, g.H, g.W, false);
              A gy(0), gxo(0), gm(0);
              for (int64_t c = go * d.Cg; c < (go + 1) * d.Cg; ++c) {
                const A gcol = gcols[col_offset(d, pi, c, t)];
                A v[4], val(0);
                for (int k = 0; k < 4; ++k) {
                  v[k] = cg.valid[k] ? static_cast<A>(xp[(b * d.HW + cg.idx[k]) * d.Cin + c]) : A(0);
                  val += cf.w[k] * (cf.valid[k] ? v[k] : A(0));
                }
                gm += gcol * val;
                gy += gcol * m * grad_y(v, cg.lx);
                gxo += gcol * m * grad_x(v, cg.ly);
                for (int k = 0; k < 4; ++k) {
                  if (cf.valid[k]) gx[cf.idx[k] * d.Cin + c] += gcol * m * cf.w[k];
                }
              }
              const int64_t ch = (b * d.G + go) * d.kk + t;
              goff[(2 * ch) * d.P + pix] = static_cast<scalar_t>(gy);
              goff[(2 * ch + 1) * d.P + pix] = static_cast<scalar_t>(gxo);
              if (gmask != nullptr) gmask[ch * d.P + pix] = static_cast<scalar_t>(gm);
            }
          }
        }
      }
      for (int64_t c = 0; c < d.Cin; ++c) {
        scalar_t* dst = gi + (b * d.Cin + c) * d.HW;
        for (int64_t hw = 0; hw < d.HW; ++hw) dst[hw] = static_cast<scalar_t>(gx[hw * d.Cin + c]);
      }
    }
  });

  at::Tensor gw_sum = gw_part[0].clone();
  at::Tensor gb_sum = gb_part[0].clone();
  for (int64_t b = 1; b < d.B; ++b) {
    gw_sum.add_(gw_part[b]);
    gb_sum.add_(gb_part[b]);
  }
  // [groups, Cout_g, kk, Cin_g] -> [Cout, Cin_g, kh, kw]
  grad_weight.copy_(gw_sum.view({d.groups, d.Cout_g, d.kk, d.Cin_g})
                        .permute({0, 1, 3, 2})
                        .reshape(grad_weight.sizes()));
  if (grad_bias.defined()) grad_bias.copy_(gb_sum);
}

void forward(const Problem& p, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "deform_conv2d",
                                  [&] { forward_typed<scalar_t>(p, out); });
}

void backward(const Problem& p, const at::Tensor& grad, at::Tensor& grad_input,
              at::Tensor& grad_offset, at::Tensor& grad_weight, at::Tensor& grad_bias,
              at::Tensor& grad_mask) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.input.scalar_type(), "deform_conv2d_backward", [&] {
        backward_typed<scalar_t>(p, grad, grad_input, grad_offset, grad_weight, grad_bias,
                                 grad_mask);
      });
}

}  // namespace

TM_DEFINE_KERNELS(TM_CPU_KERNELS(deform_conv2d), &forward, &backward)

}  // namespace deform_conv2d
}  // namespace tokenmix
