// Sampling math of deformable convolution (torchvision.ops.deform_conv2d semantics), shared by the
// CPU and CUDA kernels. No torch headers.
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenmix/macros.h"

namespace tokenmix {
namespace deform_conv2d {

// input [B, Cin, H, W] -> output [B, Cout, Ho, Wo]; kernel kh x kw with stride, padding, dilation.
struct Geometry {
  int64_t H, W, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;

  TM_HOST_DEVICE int64_t taps() const { return kh * kw; }
  // Sampling position of tap t of output pixel (oy, ox) before its learned offset.
  TM_HOST_DEVICE int64_t base_y(int64_t oy, int64_t t) const { return oy * sh - ph + (t / kw) * dh; }
  TM_HOST_DEVICE int64_t base_x(int64_t ox, int64_t t) const { return ox * sw - pw + (t % kw) * dw; }
};

// The four neighbours of a fractional position (y, x): flat indices y * W + x and bilinear
// weights, a weight of 0 (and index 0) for neighbours outside the map. With `outer_check`, a point
// at or beyond one pixel outside the map has all weights 0 (torchvision's forward rule); without
// it, only the neighbours' own validity counts (torchvision's offset-gradient rule).
template <typename A>
struct Corners {
  int64_t idx[4];  // (y0, x0), (y0, x1), (y1, x0), (y1, x1)
  A w[4];
  A ly, lx;        // fractional parts
  bool valid[4];
};

template <typename A>
TM_HOST_DEVICE Corners<A> corners(A y, A x, int64_t H, int64_t W, bool outer_check) {
  Corners<A> c;
  // A position two pixels or more outside the map has no corner inside it: it reads zero and has
  // zero gradients. NaN and infinite positions (offsets a network predicted) fail these
  // comparisons and take the same path, before any cast: converting NaN, an infinity or a value
  // of 2^63 or more to an integer is undefined behaviour.
  if (!(y > A(-2) && y < A(H) && x > A(-2) && x < A(W))) {
    c.ly = A(0);
    c.lx = A(0);
    for (int k = 0; k < 4; ++k) {
      c.valid[k] = false;
      c.idx[k] = 0;
      c.w[k] = A(0);
    }
    return c;
  }
#if defined(__CUDA_ARCH__)
  const A yf = floor(y), xf = floor(x);
#else
  const A yf = std::floor(y), xf = std::floor(x);
#endif
  const int64_t y0 = static_cast<int64_t>(yf), x0 = static_cast<int64_t>(xf);
  c.ly = y - yf;
  c.lx = x - xf;
  const bool inside = !outer_check || (y > A(-1) && y < A(H) && x > A(-1) && x < A(W));
  const A wy[2] = {A(1) - c.ly, c.ly};
  const A wx[2] = {A(1) - c.lx, c.lx};
  for (int k = 0; k < 4; ++k) {
    const int64_t yy = y0 + k / 2, xx = x0 + k % 2;
    c.valid[k] = inside && yy >= 0 && yy < H && xx >= 0 && xx < W;
    c.idx[k] = c.valid[k] ? yy * W + xx : 0;
    c.w[k] = c.valid[k] ? wy[k / 2] * wx[k % 2] : A(0);
  }
  return c;
}

// Work items of the CUDA sampling kernels (im2col, col2im): one item is one (image, offset
// group, tap, output pixel) and a run of up to `chans` of the group's channels, pixel fastest so
// neighbouring threads touch neighbouring columns. The sample position and its corners are
// computed once per item and reused for every channel of the run.
struct SampleItem {
  int64_t b;           // image, relative to the chunk's first
  int64_t go;          // offset group
  int64_t c_lo, c_hi;  // channels [c_lo, c_hi) of the input
  int64_t tap, pix;
};

TM_HOST_DEVICE int64_t channel_runs(int64_t Cg, int64_t chans) { return (Cg + chans - 1) / chans; }

TM_HOST_DEVICE int64_t sample_items(int64_t nb, int64_t G, int64_t Cg, int64_t chans, int64_t kk,
                                    int64_t P) {
  return nb * G * channel_runs(Cg, chans) * kk * P;
}

TM_HOST_DEVICE SampleItem sample_item(int64_t G, int64_t Cg, int64_t chans, int64_t kk, int64_t P,
                                      int64_t item) {
  SampleItem s;
  s.pix = item % P;
  item /= P;
  s.tap = item % kk;
  item /= kk;
  const int64_t runs = channel_runs(Cg, chans);
  const int64_t run = item % runs;
  item /= runs;
  s.go = item % G;
  s.b = item / G;
  s.c_lo = s.go * Cg + run * chans;
  const int64_t end = (s.go + 1) * Cg;
  s.c_hi = s.c_lo + chans < end ? s.c_lo + chans : end;
  return s;
}

// Flat index of column (channel c, tap) at output pixel pix of chunk image b: [nb, Cin * kk, P].
TM_HOST_DEVICE int64_t column_index(int64_t Cin, int64_t kk, int64_t P, int64_t b, int64_t c,
                                    int64_t tap, int64_t pix) {
  return ((b * Cin + c) * kk + tap) * P + pix;
}

// Implicit-GEMM view of the forward, as the fused CUDA kernel (fp16/bf16) computes it:
//   out[b, n, pix] = bias[n] + sum_k Wt[n, k] * A[m, k],   m = b * P + pix,  k = tap * Cin + c,
// A[m, k] the masked bilinear sample of channel c at tap `tap` of output pixel m, Wt the weight
// reordered to [Cout, kk * Cin] to match. K is tap-major so that the columns one thread fills
// share a sample position. One block computes a BM x BN tile of (m, n) and walks K in chunks of
// BK: each thread samples a run of kRun consecutive columns of one row into shared memory, the
// block loads the Wt chunk, and the tensor cores multiply.
struct ImplicitGemm {
  static constexpr int BM = 64, BN = 128, BK = 32, kThreads = 256;
  static constexpr int kRun = BM * BK / kThreads;  // columns per thread per chunk

  int64_t M, N, K, P, Cin;

  TM_HOST_DEVICE static ImplicitGemm make(int64_t B, int64_t Cin, int64_t Cout, int64_t kk, int64_t P) {
    return ImplicitGemm{B * P, Cout, kk * Cin, P, Cin};
  }
  TM_HOST_DEVICE int64_t row_blocks() const { return (M + BM - 1) / BM; }
  TM_HOST_DEVICE int64_t col_blocks() const { return (N + BN - 1) / BN; }
  // A-tile slot of a thread: row a_row(t), columns [a_col(t), a_col(t) + kRun) of the chunk.
  TM_HOST_DEVICE static int a_row(int thread) { return thread % BM; }
  TM_HOST_DEVICE static int a_col(int thread) { return (thread / BM) * kRun; }
  TM_HOST_DEVICE int64_t image(int64_t m) const { return m / P; }
  TM_HOST_DEVICE int64_t pixel(int64_t m) const { return m % P; }
  TM_HOST_DEVICE int64_t tap(int64_t k) const { return k / Cin; }
  TM_HOST_DEVICE int64_t channel(int64_t k) const { return k % Cin; }
  // Flat index of (m, n) in the [B, Cout, Ho, Wo] output.
  TM_HOST_DEVICE int64_t out_index(int64_t m, int64_t n) const { return (image(m) * N + n) * P + pixel(m); }
};

// The columns k, k + 1, ... of one A row in order, each with its tap, channel and offset group,
// found with one division for the whole run instead of three per column. `fresh` marks the
// columns whose sample position differs from the previous one's (the first, a new tap, a new
// offset group); the others reuse it. I: int64_t, or uint32_t where K < 2^31.
template <typename I>
struct ColumnWalkOf {
  I k, tap, c, go, group_end, Cin, Cg;
  bool fresh;

  TM_HOST_DEVICE ColumnWalkOf(I k0, I Cin_, I Cg_)
      : k(k0), tap(k0 / Cin_), c(k0 - (k0 / Cin_) * Cin_), go(0), group_end(0), Cin(Cin_), Cg(Cg_),
        fresh(true) {
    go = c / Cg;
    group_end = (go + 1) * Cg;
  }
  TM_HOST_DEVICE void next() {
    ++k;
    ++c;
    fresh = false;
    if (c == Cin) {
      c = 0;
      ++tap;
      go = 0;
      group_end = Cg;
      fresh = true;
    } else if (c == group_end) {
      ++go;
      group_end += Cg;
      fresh = true;
    }
  }
};
using ColumnWalk = ColumnWalkOf<int64_t>;
// For runs of the fused kernel that cross a tap or offset-group boundary.
using ColumnWalk32 = ColumnWalkOf<uint32_t>;
// Offset/mask channel of tap `tap` of offset group go in image b: offset rows 2 ch (dy) and
// 2 ch + 1 (dx), mask row ch, each of P pixels.
TM_HOST_DEVICE int64_t offset_channel(int64_t G, int64_t kk, int64_t b, int64_t go, int64_t tap) {
  return (b * G + go) * kk + tap;
}

// d(bilinear value)/dy and /dx from the four neighbour values (0 where invalid).
template <typename A>
TM_HOST_DEVICE A grad_y(const A v[4], A lx) {
  return (A(1) - lx) * (v[2] - v[0]) + lx * (v[3] - v[1]);
}
template <typename A>
TM_HOST_DEVICE A grad_x(const A v[4], A ly) {
  return (A(1) - ly) * (v[1] - v[0]) + ly * (v[3] - v[2]);
}


// ---- Index decomposition of the CUDA kernels --------------------------------------------------
// The kernels split their flat indices with I = uint32_t where the launcher has checked that the
// split range fits in 31 bits (a 32-bit division is a few inline instructions; a 64-bit one is a
// subroutine call), and with I = int64_t otherwise. Each function below gives the same result as
// the int64 form above; deform_items_emulation.cpp and deform_fused_emulation.cpp check that for
// every work item.

// sample_item(), computed in I.
template <typename I>
TM_HOST_DEVICE SampleItem sample_item_as(I G, I Cg, I chans, I kk, I P, I item) {
  SampleItem s;
  const I pix = item % P;
  item /= P;
  const I tap = item % kk;
  item /= kk;
  const I runs = (Cg + chans - 1) / chans;
  const I run = item % runs;
  item /= runs;
  const I go = item % G;
  s.pix = static_cast<int64_t>(pix);
  s.tap = static_cast<int64_t>(tap);
  s.go = static_cast<int64_t>(go);
  s.b = static_cast<int64_t>(item / G);
  s.c_lo = s.go * static_cast<int64_t>(Cg) + static_cast<int64_t>(run) * static_cast<int64_t>(chans);
  const int64_t end = (s.go + 1) * static_cast<int64_t>(Cg);
  s.c_hi = s.c_lo + static_cast<int64_t>(chans) < end ? s.c_lo + static_cast<int64_t>(chans) : end;
  return s;
}

// Work item of the offset-gradient kernel: thread t over [nb, G, kk, P], pixel fastest; b is
// relative to the chunk's first image.
struct CoordItem {
  int64_t b, go, tap, pix;
};

template <typename I>
TM_HOST_DEVICE CoordItem coord_item(I G, I kk, I P, I t) {
  CoordItem c;
  c.pix = static_cast<int64_t>(t % P);
  t /= P;
  c.tap = static_cast<int64_t>(t % kk);
  t /= kk;
  c.go = static_cast<int64_t>(t % G);
  c.b = static_cast<int64_t>(t / G);
  return c;
}

// Geometry::base_y / base_x with the output pixel split into (oy, ox) and the tap into (ky, kx)
// once by the caller, so no division is left per sample.
TM_HOST_DEVICE int64_t origin_y(const Geometry& g, int64_t oy, int64_t ky) { return oy * g.sh - g.ph + ky * g.dh; }
TM_HOST_DEVICE int64_t origin_x(const Geometry& g, int64_t ox, int64_t kx) { return ox * g.sw - g.pw + kx * g.dw; }

// q = v / d and r = v % d, computed in I.
template <typename I>
struct DivMod {
  I q, r;
};
template <typename I>
TM_HOST_DEVICE DivMod<I> divmod(I v, I d) {
  const I q = v / d;
  return DivMod<I>{q, v - q * d};
}

// Tiles of the fused forward, N tile chosen from Cout at launch (a 64-wide tile when Cout <= 64,
// so no tensor-core work is spent on zero columns). The M, K tiles, thread count and A-slot layout
// (a_row, a_col) are ImplicitGemm's.
template <int BN_>
struct FusedTile {
  static constexpr int BM = ImplicitGemm::BM, BN = BN_, BK = ImplicitGemm::BK, kThreads = ImplicitGemm::kThreads;
  static constexpr int kRun = ImplicitGemm::kRun;
  // Epilogue: thread t writes row t % BM (its A row) and columns t / BM + s * kColStep.
  static constexpr int kColStep = kThreads / BM, kColSteps = BN / kColStep;
  // Wt chunk staged as 16-byte segments of 8 columns: kSegs per row, kSegsPerThread per thread.
  static constexpr int kSegs = BK / 8, kSegsPerThread = BN * kSegs / kThreads;
  TM_HOST_DEVICE static int64_t col_blocks(int64_t N) { return (N + BN - 1) / BN; }
  TM_HOST_DEVICE static int seg_row(int seg) { return seg / kSegs; }
  TM_HOST_DEVICE static int seg_col(int seg) { return (seg % kSegs) * 8; }
};

// The run of kRun columns [k, k + kRun) of one A row when one sample position serves all of it:
// the offset-group size Cg is a multiple of kRun and k % kRun == 0, so no tap or group boundary
// falls inside the run. 32-bit: K = kk * Cin < 2^31 is checked by the launcher.
struct RunColumns {
  uint32_t tap, c, go;
  uint32_t key;  // go * kk + tap: the offset/mask channel within the image; equal keys, equal positions
};
TM_HOST_DEVICE RunColumns run_columns(uint32_t k, uint32_t Cin, uint32_t Cg, uint32_t kk) {
  RunColumns r;
  r.tap = k / Cin;
  r.c = k - r.tap * Cin;
  r.go = r.c / Cg;
  r.key = r.go * kk + r.tap;
  return r;
}

// The flat index of corner (y0, x0) from a corners() result, so that every valid corner k sits at
// corner_base + (k / 2) * W + k % 2: a kernel then addresses a plane's four corners from one base
// (two 64-bit addresses, one of them with a +1 immediate) instead of four. Meaningless, and unused,
// when no corner is valid. The range is [-W - 1, H * W): int32 when H * W < 2^31 (host-checked).
template <typename A>
TM_HOST_DEVICE int64_t corner_base(const Corners<A>& c, int64_t W) {
  return c.valid[0] ? c.idx[0] : c.valid[1] ? c.idx[1] - 1 : c.valid[2] ? c.idx[2] - W : c.idx[3] - W - 1;
}

// Where the fused kernel's output row m (image b = m / P, pixel pix = m % P, both split once per
// thread) starts in [B, Cout, Ho, Wo]: column n is at out_row_base + n * P (ImplicitGemm::out_index).
TM_HOST_DEVICE int64_t out_row_base(int64_t b, int64_t N, int64_t P, int64_t pix) { return b * N * P + pix; }

}  // namespace deform_conv2d
}  // namespace tokenmix
