// CPU kernels of HorNet's recursive gated convolution (gnConv).
//
// Work is split into tiles: bands of whole rows of one image, about kTilePixels pixels each,
// fixed by the shape so that per-tile partial sums, added in tile order, make every result
// independent of the thread count. Inside a tile everything is channels-last rows [pixel, channel]
// in the accumulation type.
//
// Forward, per tile:
//   A. F = x W_in^T for the rows of the band and its depthwise halo not yet computed, one GEMM
//      per chunk of rows (x read in place, NCHW or NHWC) into the thread's copy of the image's F,
//      so that F is mostly read back from cache and never exists at full size; proj_in's bias is
//      added where F is read.
//   B. the depthwise k x k conv of F's gate channels (packed into a zero-bordered band first)
//      + bias, times the scale, with the first gate (p0 * g_0) in its epilogue; each
//      pws step is a register-blocked GEMM with the bias and the gate g_i in its epilogue
//      (gated_gemm); proj_out's GEMM writes the output tile in x's memory format, and its bias
//      is added while the tile is in cache.
// Backward saves nothing but the operands: pass A recomputes all of F with the same chunk
// GEMMs, pass B recomputes each tile's gates and chain with the forward's kernels (gated_gemm
// keeping each pre-gate z_i too) and runs it backwards (weight-gradient
// partials per tile, the gate gradient dD and dL/dp0 into full-size buffers), pass C turns dD
// into dL/dq (the depthwise conv with the flipped kernel), the depthwise weight/bias gradients,
// and then grad_x = dF W_in and W_in's gradient per tile.
//
// The depthwise conv is gnconv_cpu_depthwise.h; the scratch buffers, row helpers, blocked GEMMs
// and the tile scheduler are the shared CPU pieces of csrc/cpu/.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/blocked_gemm.h"
#include "cpu/rows.h"
#include "cpu/scratch.h"
#include "cpu/tile_scheduler.h"
#include "gnconv_cpu_depthwise.h"
#include "gnconv_problem.h"
#include "tokenmix/checks.h"

namespace tokenmix {
namespace gnconv {
namespace {

using namespace cpu;

constexpr int64_t kTilePixels = 1024;
// Largest per-thread copy of one image's projection F kept between calls; a larger one (a big
// detection-size map) is allocated for the call, so idle threads do not hold on to it.
constexpr int64_t kMaxCachedImageF = int64_t(8) << 20;

// Bands of rows of one image; tile t covers image t / bands, rows [y0, y1). The bands of an image
// are as even as whole rows allow: a short last band would pay the depthwise halo for few rows.
// proj_in's output F is computed in chunks, the bands shifted down by the depthwise halo: chunk j
// holds the rows band j's conv reads that band j - 1's did not, so a tile reads most of its F
// right after computing it.
struct Tiling {
  int64_t B, H, W, HW, pad, rows, bands, count;

  Tiling(int64_t B_, const DwGeometry& g)
      : B(B_), H(g.H), W(g.W), HW(g.H * g.W), pad(g.pad()), count(0) {
    const int64_t h = std::max<int64_t>(H, 1);
    const int64_t target = std::clamp<int64_t>(kTilePixels / std::max<int64_t>(W, 1), 1, h);
    bands = (h + target - 1) / target;
    rows = (h + bands - 1) / bands;
    bands = (h + rows - 1) / rows;
    count = B * bands;
  }
  int64_t image(int64_t t) const { return t / bands; }
  int64_t band(int64_t t) const { return t % bands; }
  int64_t y0(int64_t t) const { return band(t) * rows; }
  int64_t y1(int64_t t) const { return std::min(H, y0(t) + rows); }
  int64_t max_pixels() const { return rows * W; }
  int64_t chunk_y0(int64_t j) const { return j == 0 ? 0 : std::min(H, j * rows + pad); }
  int64_t chunk_y1(int64_t j) const { return std::min(H, (j + 1) * rows + pad); }
  int64_t chunk_of_row(int64_t y) const { return y < pad ? 0 : std::min(bands - 1, (y - pad) / rows); }
};

// The calling thread's scratch buffers (cpu/scratch.h) of the passes, besides the depthwise
// conv's. Each grows to the largest tile seen, bounded by kTilePixels times the channel count;
// kImageF by kMaxCachedImageF.
enum class Slot { kGates, kYs, kZs, kGradA, kGradB, kGradX, kImageF, kPanels, kCount };

// dst[r, :n] = (src[r, :n] + bias[:n]) * g[r, :n]: a gate with its step's bias.
template <typename A>
void bias_gate(int64_t rows, int64_t n, A* dst, int64_t ldd, const A* src, int64_t lds, const A* bias,
               const A* g, int64_t ldg) {
  rowwise<A>(rows, n, dst, ldd, [](auto u, auto b, auto v) { return (u + b) * v; }, Rows<A>{src, lds},
             Rows<A>{bias, 0}, Rows<A>{g, ldg});
}

// ---- the pws steps -----------------------------------------------------------------------------
//
// y_i = (y_{i-1} W_i^T + b_i) * g_i over a tile's pixels: cpu::gated_gemm. The widths are narrow
// (dim / 2^(n-i)): through the BLAS, each tile's GEMM re-packed W_i, and its output made one more
// trip through memory for the gate. Here each thread packs W_i once per call.

// A thread's panels of every W_i (i = 1 .. order - 1) for the call: panel(i).
template <typename A>
class ChainPanels {
  std::vector<const A*> at_;

 public:
  template <class W>
  ChainPanels(const W& w, const Layout& L) : at_(L.order, nullptr) {
    int64_t size = 0;
    for (int64_t i = 1; i < L.order; ++i) size += pack_panels<A>(nullptr, L.dims[i], L.dims[i - 1], nullptr);
    A* panels = scratch<A>(Slot::kPanels, size);
    for (int64_t i = 1, off = 0; i < L.order; ++i) {
      at_[i] = panels + off;
      off += pack_panels<A>(w.w_pw[i - 1].template const_data_ptr<A>(), L.dims[i], L.dims[i - 1], panels + off);
    }
  }
  const A* operator()(int64_t i) const { return at_[i]; }
};

// ---- the op -----------------------------------------------------------------------------------

// Weights in the accumulation type and the layouts the kernels read.
// Built with plain loops and views: at HorNet's late stages the per-call setup is otherwise a
// few percent of the whole op.
template <typename scalar_t>
struct Weights {
  using A = at::opmath_type<scalar_t>;
  at::Tensor w_in, b_in, w_dw, b_dw, w_out, b_out;  // w_dw: [S, k * k]
  std::vector<at::Tensor> w_pw, b_pw;               // w_*: [out, in]

  // Plain tensors: the worker threads of at::parallel_for do not inherit the caller's
  // below-autograd dispatch state, and out= GEMMs refuse operands that require grad. In the
  // accumulation type already, a parameter's own (contiguous) memory is used as is.
  static at::Tensor acc(const at::Tensor& t, at::IntArrayRef sizes) {
    if constexpr (std::is_same_v<scalar_t, A>) {
      return blob(const_cast<A*>(t.const_data_ptr<A>()), sizes);
    } else {
      return t.detach().to(c10::CppTypeToScalarType<A>::value).view(sizes);
    }
  }

  explicit Weights(const Problem& p) {
    const auto mat = [](const at::Tensor& w) { return acc(w, {w.size(0), w.size(1)}); };
    const auto vec = [](const at::Tensor& b) { return acc(b, {b.size(0)}); };
    w_in = mat(p.w_in);
    w_out = mat(p.w_out);
    b_in = vec(p.b_in);
    b_out = vec(p.b_out);
    b_dw = vec(p.b_dw);
    for (size_t i = 0; i < p.w_pw.size(); ++i) {
      w_pw.push_back(mat(p.w_pw[i]));
      b_pw.push_back(vec(p.b_pw[i]));
    }
    w_dw = acc(p.w_dw, {p.lay.S, p.geo.taps()});
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
  Weights<scalar_t> w;
  at::Tensor xa;  // x in the accumulation type, x's memory format
  at::Tensor F;   // [B * H * W, 2 dim], made by project_in() (backward)
  int64_t P2;     // 2 dim

  explicit Call(const Problem& p_)
      : p(p_), L(p_.lay), g(p_.geo), tiles(p_.x.size(0), p_.geo),
        w(p_),
        xa(p_.x.detach().to(acc_scalar_type(p_.x.scalar_type()))),
        P2(p_.lay.proj_width()) {}

  // x rows [pix0, pix0 + np) of image b as an [np, dim] matrix (a transposed view for NCHW).
  at::Tensor x_rows(int64_t b, int64_t pix0, int64_t np) const {
    return xa[b].flatten(1).narrow(1, pix0, np).t();
  }
  A* F_image(int64_t b) const { return F.mutable_data_ptr<A>() + b * tiles.HW * P2; }

  // F = x W_in^T for the pixels of chunk j of image b, into F_img (the image's pixel 0): one
  // GEMM (x read in place, NCHW or NHWC) whose shape depends on the chunk alone, so F's bits do
  // not depend on which thread computes it or on the thread count. proj_in's bias is added where
  // F is read (the first gate, the depthwise conv's packing), which saves a pass over F.
  void project_chunk(int64_t b, int64_t j, A* F_img, int64_t ld) const {
    const int64_t pix0 = tiles.chunk_y0(j) * g.W, np = tiles.chunk_y1(j) * g.W - pix0;
    if (np <= 0) return;
    at::Tensor dst = at::from_blob(F_img + pix0 * ld, {np, P2}, {ld, 1},
                                   at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    at::mm_out(dst, x_rows(b, pix0, np), w.w_in.t());
  }

  // Pass A (backward): F for every pixel.
  void project_in() {
    F = at::empty({tiles.B * tiles.HW, P2}, xa.options().memory_format(at::MemoryFormat::Contiguous));
    for_each_tile([&] {
      return [&](int64_t t) { project_chunk(tiles.image(t), tiles.band(t), F_image(tiles.image(t)), P2); };
    });
  }

  // Runs make_worker()(t) on every tile (cpu::for_each_tile). Each thread's share of the tiles is
  // contiguous and taken in order: neighbouring bands share F's rows, in that thread's cache.
  template <class MakeWorker>
  void for_each_tile(const MakeWorker& make_worker) const {
    cpu::for_each_tile(tiles.count, make_worker);
  }

  // The tile's gates g = scale * (dwconv(q) + b_dw), [np, S]; Fb: F of the tile's image.
  // taps: this thread's dw_taps(false).
  DwArgs<A> gate_args(int64_t t, const A* Fb, int64_t ld, const A* taps, A* gbuf) const {
    return DwArgs<A>{Fb + L.dims[0], ld, w.b_in.template const_data_ptr<A>() + L.dims[0], taps,
                     w.b_dw.template const_data_ptr<A>(),
                     static_cast<A>(p.scale), L.S, tiles.y0(t), tiles.y1(t), gbuf, L.S};
  }
  void gates(int64_t t, const A* Fb, int64_t ld, const A* taps, A* gbuf) const {
    depthwise<A>(gate_args(t, Fb, ld, taps, gbuf), g);
  }
  // The depthwise kernel as the calling thread's conv reads it (block_major_taps).
  const A* dw_taps(bool flipped) const {
    return block_major_taps<A>(w.w_dw.template const_data_ptr<A>(), L.S, g.taps(), flipped);
  }

  // The same, and the first gate y_0 = (p_0 + b_in) * g_0 into y [np, dims[0]]: in the conv's
  // epilogue for whole blocks of channels, the rest in cache after it. g_0 is then not in gbuf.
  void gates_and_first(int64_t t, const A* Fb, int64_t ld, const A* taps, A* gbuf, A* y) const {
    const int64_t d0 = L.dims[0];
    const A* p0 = Fb + tiles.y0(t) * g.W * ld;
    const A* b_in = w.b_in.template const_data_ptr<A>();
    DwArgs<A> a = gate_args(t, Fb, ld, taps, gbuf);
    a.gate_channels = d0;
    a.gate_p = p0;
    a.gate_ld_p = ld;
    a.gate_bias = b_in;
    a.gate_y = y;
    a.gate_ld_y = d0;
    depthwise<A>(a, g);
    const int64_t done = a.gated(), np = (tiles.y1(t) - tiles.y0(t)) * g.W;
    if (done < d0) bias_gate<A>(np, d0 - done, y + done, d0, p0 + done, ld, b_in + done, gbuf + done, L.S);
  }

  // Element (pixel, c) of image b of a tensor in x's memory format: base + pixel * ps + c * cs.
  int64_t pixel_stride() const { return p.x.stride(3); }
  int64_t channel_stride() const { return p.x.stride(1); }
};

// The forward's F of one image, kept by the thread that works on its bands: computed chunk by
// chunk as the depthwise halo reaches it, so that the gates and the first gate read it from
// cache. Only a chunk next to a band another thread ran is computed twice.
template <typename scalar_t>
class ImageProjection {
  using A = at::opmath_type<scalar_t>;
  const Call<scalar_t>& call;
  AlignedBuffer<A> own;
  A* F;
  int64_t image = -1, lo = 0, hi = 0;  // chunks [lo, hi) of `image` are in F

 public:
  // Floats between pixels: one cache line more than a pixel's channels, so that a run of pixels'
  // loads of one channel block does not fall into a few cache sets.
  int64_t pitch() const { return call.P2 + 64 / int64_t(sizeof(A)); }

  explicit ImageProjection(const Call<scalar_t>& c) : call(c) {
    const int64_t n = c.tiles.HW * pitch();
    if (n * int64_t(sizeof(A)) <= kMaxCachedImageF) {
      F = scratch<A>(Slot::kImageF, n);
    } else {
      own = aligned_buffer<A>(n);
      F = own.get();
    }
  }

  // F of tile t's image, valid on the rows the tile's depthwise conv reads.
  const A* rows_for(int64_t t) {
    const Tiling& tl = call.tiles;
    const int64_t pad = tl.pad;
    const int64_t first = tl.chunk_of_row(std::max<int64_t>(0, tl.y0(t) - pad));
    const int64_t last = tl.chunk_of_row(std::min(tl.H, tl.y1(t) + pad) - 1);
    // The computed chunks stay one contiguous run: a thread that helps with another share walks
    // its bands backwards, and extends the run downwards.
    if (tl.image(t) != image || last + 1 < lo || first > hi) {
      image = tl.image(t);
      lo = hi = first;
    }
    for (; lo > first; --lo) call.project_chunk(image, lo - 1, F, pitch());
    for (; hi <= last; ++hi) call.project_chunk(image, hi, F, pitch());
    return F;
  }
};

template <typename scalar_t>
void forward_typed(const Problem& p, at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;
  Call<scalar_t> call(p);
  const Layout& L = p.lay;
  const Tiling& tiles = call.tiles;
  const int64_t C = L.dim, n = L.order;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t ps = out.stride(3), cs = out.stride(1);

  call.for_each_tile([&] {
    const int64_t mp = tiles.max_pixels();
    return [&, panel = ChainPanels<A>(call.w, L), taps = call.dw_taps(false), gbuf = scratch<A>(Slot::kGates, mp * L.S),
            ys = scratch<A>(Slot::kYs, mp * C),
            zs = scratch<A>(Slot::kZs, mp * C), proj = ImageProjection<scalar_t>(call)](int64_t t) mutable {
      const int64_t b = tiles.image(t), pix0 = tiles.y0(t) * p.geo.W;
      const int64_t np = (tiles.y1(t) - tiles.y0(t)) * p.geo.W;
      const A* Fb = proj.rows_for(t);
      A* y = ys;
      A* spare = zs;
      call.gates_and_first(t, Fb, proj.pitch(), taps, gbuf, y);
      for (int64_t i = 1; i < n; ++i) {
        gated_gemm<A>(np, L.dims[i], L.dims[i - 1], y, L.dims[i - 1], panel(i),
                      {call.w.b_pw[i - 1].template const_data_ptr<A>(), gbuf + L.offs[i], L.S, spare, L.dims[i]});
        std::swap(y, spare);
      }
      A* z = spare;
      const at::Tensor yt = blob(y, {np, C});
      const A* bo = call.w.b_out.template const_data_ptr<A>();
      const auto add = [](auto u, auto v) { return u + v; };
      if constexpr (std::is_same_v<scalar_t, A>) {
        // out rows (NHWC) or out^T columns (NCHW) of this band, written by the GEMM in place,
        // then the bias while they are in cache.
        A* ob = o + b * out.stride(0) + pix0 * ps;
        if (cs == 1) {
          at::Tensor dst = out[b].permute({1, 2, 0}).reshape({-1, C}).narrow(0, pix0, np);
          at::mm_out(dst, yt, call.w.w_out.t());
          rowwise<A>(np, C, ob, ps, add, Rows<A>{ob, ps}, Rows<A>{bo, 0});
        } else {
          at::Tensor dst = out[b].view({C, -1}).narrow(1, pix0, np);
          at::mm_out(dst, call.w.w_out, yt.t());
          for (int64_t c = 0; c < C; ++c) {
            const Vec<A> bc(bo[c]);
            at::vec::map([bc](Vec<A> v) { return v + bc; }, ob + c * cs, ob + c * cs, np);
          }
        }
      } else {
        at::Tensor ot = blob(z, {np, C});
        at::mm_out(ot, yt, call.w.w_out.t());
        rowwise<A>(np, C, z, C, add, Rows<A>{z, C}, Rows<A>{bo, 0});
        store_tile<scalar_t, A>(z, np, C, o + b * out.stride(0) + pix0 * ps, ps, cs);
      }
    };
  });
}

// Per-tile partial sums of the parameter gradients, added in tile order at the end.
template <typename A>
struct Partials {
  at::Tensor w_in, b_in, w_dw, b_dw, w_out, b_out;
  std::vector<at::Tensor> w_pw, b_pw;

  template <class W>
  Partials(int64_t T, const W& w, const Layout& L, int64_t taps) {
    const auto like = [T](const at::Tensor& t) {
      std::vector<int64_t> s{T};
      s.insert(s.end(), t.sizes().begin(), t.sizes().end());
      return at::zeros(s, t.options());
    };
    w_in = like(w.w_in);
    b_in = like(w.b_in);
    w_dw = at::zeros({T, taps, L.S}, w.b_dw.options());  // tap-major
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
  const auto mul = [](auto u, auto v) { return u * v; };
  const auto mul_scaled = [scale](auto u, auto v) { return u * v * decltype(u)(scale); };
  Partials<A> part(tiles.count, call.w, L, g.taps());
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t ps = call.pixel_stride(), cs = call.channel_stride();

  // Pass A again, then B: the tile's gates and chain recomputed and run backwards.
  call.project_in();
  // dD: gradient of the gates before the scale (of dwconv(q) + b_dw), [N, S]; dF: of F, [N, 2 dim].
  at::Tensor dD = at::empty({tiles.B * tiles.HW, S}, call.F.options());
  at::Tensor dF = at::empty_like(call.F);
  call.for_each_tile([&] {
    const int64_t mp = tiles.max_pixels();
    return [&, panel = ChainPanels<A>(call.w, L), taps = call.dw_taps(false), gbuf = scratch<A>(Slot::kGates, mp * S),
            ys = scratch<A>(Slot::kYs, mp * S), zs = scratch<A>(Slot::kZs, mp * S), da = scratch<A>(Slot::kGradA, mp * C),
            db = scratch<A>(Slot::kGradB, mp * C)](int64_t t) {
      const int64_t b = tiles.image(t), pix0 = tiles.y0(t) * g.W;
      const int64_t np = (tiles.y1(t) - tiles.y0(t)) * g.W;
      const A* Ft = call.F_image(b) + pix0 * P2;
      A* dDt = dD.mutable_data_ptr<A>() + (b * tiles.HW + pix0) * S;
      A* dFt = dF.mutable_data_ptr<A>() + (b * tiles.HW + pix0) * P2;
      call.gates(t, call.F_image(b), P2, taps, gbuf);
      // y_i at ys + np * offs[i], pre-gate z_i (bias included) at zs + np * offs[i].
      const auto Y = [&](int64_t i) { return ys + np * L.offs[i]; };
      const auto Z = [&](int64_t i) { return zs + np * L.offs[i]; };
      bias_gate<A>(np, d0, Y(0), d0, Ft, P2, call.w.b_in.template const_data_ptr<A>(), gbuf, S);
      for (int64_t i = 1; i < n; ++i) {
        // As the forward computes it, keeping the pre-gate z_i too.
        const int64_t di = L.dims[i];
        gated_gemm<A>(np, di, L.dims[i - 1], Y(i - 1), L.dims[i - 1], panel(i),
                      {call.w.b_pw[i - 1].template const_data_ptr<A>(), gbuf + L.offs[i], S, Y(i), di, Z(i), di});
      }
      // proj_out
      load_tile<scalar_t, A>(gp + b * grad.stride(0) + pix0 * ps, ps, cs, np, C, da);
      const at::Tensor dO = blob(da, {np, C});
      weight_grad<A>(np, C, C, da, C, 1, Y(n - 1), C, part.w_out[t].template mutable_data_ptr<A>(), C, 1);
      column_sums<A>(np, C, da, C, part.b_out[t].template mutable_data_ptr<A>());
      A* dy = db;
      A* spare = da;
      at::Tensor dyt = blob(dy, {np, C});
      at::mm_out(dyt, dO, call.w.w_out);
      // pws steps, last first: dg_i = dy * z_i, dz_i = dy * g_i, dy_{i-1} = dz_i W_i.
      for (int64_t i = n - 1; i >= 1; --i) {
        const int64_t di = L.dims[i], dp = L.dims[i - 1];
        rowwise<A>(np, di, dDt + L.offs[i], S, mul_scaled, Rows<A>{dy, di}, Rows<A>{Z(i), di});
        rowwise<A>(np, di, dy, di, mul, Rows<A>{dy, di}, Rows<A>{gbuf + L.offs[i], S});
        const at::Tensor dz = blob(dy, {np, di});
        weight_grad<A>(np, di, dp, dy, di, 1, Y(i - 1), dp, part.w_pw[i - 1][t].template mutable_data_ptr<A>(), dp, 1);
        column_sums<A>(np, di, dy, di, part.b_pw[i - 1][t].template mutable_data_ptr<A>());
        at::Tensor nxt = blob(spare, {np, dp});
        at::mm_out(nxt, dz, call.w.w_pw[i - 1]);
        std::swap(dy, spare);
      }
      // first gate: y_0 = (p0 + b_in) * g_0
      rowwise<A>(np, d0, dDt, S, [scale](auto u, auto p0, auto bias) { return u * (p0 + bias) * decltype(u)(scale); },
                 Rows<A>{dy, d0}, Rows<A>{Ft, P2}, Rows<A>{call.w.b_in.template const_data_ptr<A>(), 0});
      rowwise<A>(np, d0, dFt, P2, mul, Rows<A>{dy, d0}, Rows<A>{gbuf, S});
    };
  });

  // Pass C: dL/dq, the depthwise and proj_in parameter gradients, grad_x.
  scalar_t* gx = gr.x.mutable_data_ptr<scalar_t>();
  const int64_t gps = gr.x.stride(3), gcs = gr.x.stride(1);
  call.for_each_tile([&] {
    return [&, taps = call.dw_taps(true), dx = scratch<A>(Slot::kGradX, tiles.max_pixels() * C)](int64_t t) {
      const int64_t b = tiles.image(t), y0 = tiles.y0(t), y1 = tiles.y1(t);
      const int64_t pix0 = y0 * g.W, np = (y1 - y0) * g.W;
      const A* dDb = dD.const_data_ptr<A>() + b * tiles.HW * S;
      A* dFt = dF.mutable_data_ptr<A>() + (b * tiles.HW + pix0) * P2;
      depthwise<A>(DwArgs<A>{dDb, S, nullptr, taps, nullptr, A(1), S, y0, y1, dFt + d0, P2}, g);
      depthwise_weight_grad<A>(call.F_image(b) + d0, P2, call.w.b_in.template const_data_ptr<A>() + d0, dDb, S, S, g,
                               y0, y1, part.w_dw[t].template mutable_data_ptr<A>());
      column_sums<A>(np, S, dDb + pix0 * S, S, part.b_dw[t].template mutable_data_ptr<A>());
      column_sums<A>(np, P2, dFt, P2, part.b_in[t].template mutable_data_ptr<A>());
      const at::Tensor dFm = blob(dFt, {np, P2});
      // W_in's gradient dF^T x, vectorised along whichever of its sides is contiguous.
      const int64_t xp = call.xa.stride(3), xc = call.xa.stride(1);
      const A* xt = call.xa.template const_data_ptr<A>() + b * call.xa.stride(0) + pix0 * xp;
      A* gwi = part.w_in[t].template mutable_data_ptr<A>();
      if (xc == 1) {
        weight_grad<A>(np, P2, C, dFt, P2, 1, xt, xp, gwi, C, 1);
      } else {
        weight_grad<A>(np, C, P2, xt, xp, xc, dFt, P2, gwi, 1, C);
      }
      at::Tensor dxt = blob(dx, {np, C});
      at::mm_out(dxt, dFm, call.w.w_in);
      store_tile<scalar_t, A>(dx, np, C, gx + b * gr.x.stride(0) + pix0 * gps, gps, gcs);
    };
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


TM_DEFINE_KERNELS(TM_CPU_KERNELS(gnconv), &forward, &backward)

}  // namespace gnconv
}  // namespace tokenmix
