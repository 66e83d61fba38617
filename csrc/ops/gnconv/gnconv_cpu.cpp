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

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "gnconv_cpu.h"
#include "tokenmix/checks.h"

namespace tokenmix {
namespace gnconv {
namespace {

constexpr int64_t kTilePixels = 1024;
// Largest per-thread copy of one image's projection F kept between calls; a larger one (a big
// detection-size map) is allocated for the call, so idle threads do not hold on to it.
constexpr int64_t kMaxCachedImageF = int64_t(8) << 20;
// Output pixels per register block of the depthwise conv: its sums and one kernel row's inputs
// (kStrip + k - 1 vectors) stay in registers; AVX-512 has 32 of them, the other ISAs 16.
// kStripAlt serves rows whose width it divides and kStrip does not: HorNet's 28-, 14- and 7-wide
// maps would otherwise compute 1/8 of their outputs in strip tails that are thrown away.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStrip = 8;
constexpr int64_t kStripAlt = 7;
#else
constexpr int64_t kStrip = 4;
constexpr int64_t kStripAlt = kStrip;
#endif
// Register block of the gated GEMM: kGemmRows rows x kGemmCols vectors of sums, plus kGemmCols
// vectors of the weight panel and one broadcast, within the ISA's registers (AVX-512: 6 x 4 + 5 of
// 32; the others: 4 x 2 + 3 of 16).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kGemmRows = 6;
constexpr int64_t kGemmCols = 4;
#else
constexpr int64_t kGemmRows = 4;
constexpr int64_t kGemmCols = 2;
#endif

template <typename A>
using Vec = at::vec::Vectorized<A>;

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

template <typename A>
at::Tensor blob(A* p, at::IntArrayRef sizes) {
  return at::from_blob(p, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

// Scratch memory of the calling thread, one buffer per use, kept between calls so that the
// kernels do not fault in fresh pages every time (it grows to the largest tile seen, bounded by
// kTilePixels times the channel count; kImageF by kMaxCachedImageF). Cache-line aligned, so
// that a GEMM into it sees the same alignment whichever thread runs it. Left uninitialised: every
// kernel writes before it reads.
enum Slot { kBand, kGradBand, kGates, kYs, kZs, kGradA, kGradB, kGradX, kImageF, kPanels, kDwTaps, kSlots };

struct AlignedFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(64)); }
};

template <typename A>
using AlignedBuffer = std::unique_ptr<A[], AlignedFree>;

template <typename A>
AlignedBuffer<A> aligned_buffer(int64_t n) {
  return AlignedBuffer<A>(static_cast<A*>(::operator new[](n * sizeof(A), std::align_val_t(64))));
}

template <typename A>
A* scratch(Slot slot, int64_t n) {
  static thread_local AlignedBuffer<A> buf[kSlots];
  static thread_local int64_t cap[kSlots] = {};
  if (n > cap[slot]) {
    buf[slot] = aligned_buffer<A>(n);
    cap[slot] = n;
  }
  return buf[slot].get();
}

// ---- vectorised row helpers -------------------------------------------------------------------

// An operand of rowwise: row r starts at p + r * ld (ld = 0: one row for all, e.g. a bias).
template <typename A>
struct Rows {
  const A* p;
  int64_t ld;
};

// dst[r, :n] = op(in_0[r, :n], in_1[r, :n], ...) for r < rows; op takes and returns Vec<A> or A.
template <typename A, typename Op, typename... In>
void rowwise(int64_t rows, int64_t n, A* dst, int64_t ldd, const Op& op, In... in) {
  constexpr int64_t V = Vec<A>::size();
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * ldd;
    int64_t c = 0;
    for (; c + V <= n; c += V) op(Vec<A>::loadu(in.p + r * in.ld + c)...).store(d + c);
    for (; c < n; ++c) d[c] = op(in.p[r * in.ld + c]...);
  }
}

// dst[r, :n] = (src[r, :n] + bias[:n]) * g[r, :n]: a gate with its step's bias.
template <typename A>
void bias_gate(int64_t rows, int64_t n, A* dst, int64_t ldd, const A* src, int64_t lds, const A* bias,
               const A* g, int64_t ldg) {
  rowwise<A>(rows, n, dst, ldd, [](auto u, auto b, auto v) { return (u + b) * v; }, Rows<A>{src, lds},
             Rows<A>{bias, 0}, Rows<A>{g, ldg});
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
void store_tile(const A* src, int64_t np, int64_t C, scalar_t* base, int64_t ps, int64_t cs) {
  if (cs == 1) {
    for (int64_t i = 0; i < np; ++i) {
      for (int64_t c = 0; c < C; ++c) base[i * ps + c] = static_cast<scalar_t>(src[i * C + c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < np; ++i) base[c * cs + i * ps] = static_cast<scalar_t>(src[i * C + c]);
    }
  }
}

// dst[c, i] = src[i, c] for i < rows, c < cols; src and dst row-major with leading dimensions
// ld_src, ld_dst. In 16 x 16 blocks held in registers where the ISA has a kernel for them.
template <typename A>
void transpose(const A* src, int64_t ld_src, int64_t rows, int64_t cols, A* dst, int64_t ld_dst) {
  constexpr int T = 16;
  for (int64_t i = 0; i < rows; i += T) {
    for (int64_t c = 0; c < cols; c += T) {
      const A* s = src + i * ld_src + c;
      A* d = dst + c * ld_dst + i;
      if (i + T <= rows && c + T <= cols) {
        at::vec::transpose_mxn<A, T, T>(s, ld_src, d, ld_dst);
      } else {
        at::vec::transpose_mxn<A>(s, ld_src, d, ld_dst, static_cast<int>(std::min<int64_t>(T, rows - i)),
                                  static_cast<int>(std::min<int64_t>(T, cols - c)));
      }
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
//
// Both depthwise kernels work one block of V channels at a time on a packed copy of the band's
// input rows (plus k/2 halo rows and columns of zeros). Reading the channels-last operands in
// place would step 2 dim or S floats between neighbouring pixels: a power-of-two stride that maps
// every load of a block to a few L1 sets. Packed, a k x k window is contiguous vectors and the
// zero border removes every bounds check from the tap loops.

template <typename A>
inline Vec<A> load_n(const A* p, int64_t n) {
  return n == Vec<A>::size() ? Vec<A>::loadu(p) : Vec<A>::loadu(p, n);
}

template <typename A>
inline void store_n(const Vec<A>& v, A* p, int64_t n) {
  if (n == Vec<A>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// A band of rows [y0, y1) of S channels, zero-padded by pad on every side and on the right up to
// whole strips, stored block by block: element (y, x) of channel block cb at
// data + ((cb * rows + y - y0 + pad) * pw + x + pad) * V.
template <typename A>
struct PackedBand {
  static constexpr int64_t V = Vec<A>::size();
  int64_t y0, pad, pw, strips, rows, blocks;
  A* data;

  PackedBand(const DwGeometry& g, int64_t S, int64_t y0_, int64_t y1, int64_t pad_, Slot slot,
             int64_t strip = kStrip)
      : y0(y0_), pad(pad_), strips((g.W + strip - 1) / strip), rows(y1 - y0_ + 2 * pad_),
        blocks((S + V - 1) / V) {
    pw = strips * strip + 2 * pad;
    data = scratch<A>(slot, blocks * rows * pw * V);
  }
  const A* at(int64_t cb, int64_t y, int64_t x) const {
    return data + ((cb * rows + y - y0 + pad) * pw + x + pad) * V;
  }

  // src (+ add[c] when add is not null): the image's pixel 0, ld apart; zeros outside the map
  // and for channels past S.
  void pack(const A* src, int64_t ld, const DwGeometry& g, int64_t S, const A* add) {
    const int64_t block = rows * pw * V;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = y0 - pad + r;
      for (int64_t cb = 0; cb < blocks; ++cb) {
        A* row = data + cb * block + r * pw * V;
        if (y < 0 || y >= g.H) {
          std::fill(row, row + pw * V, A(0));
        } else {
          std::fill(row, row + pad * V, A(0));
          std::fill(row + (pad + g.W) * V, row + pw * V, A(0));
        }
      }
      if (y < 0 || y >= g.H) continue;
      // Pixel by pixel: each pixel's channels are one sequential read, and each block's row one
      // sequential stream of stores. Reading a block's row instead would step ld floats between
      // loads and take a cache line per load, every line of the row once per block.
      const A* in = src + y * g.W * ld;
      A* out = data + (r * pw + pad) * V;
      const int64_t full = S / V, n = S - full * V;
      for (int64_t x = 0; x < g.W; ++x) {
        const A* px = in + x * ld;
        A* o = out + x * V;
        for (int64_t cb = 0; cb < full; ++cb) {
          const Vec<A> v = Vec<A>::loadu(px + cb * V);
          (add ? v + Vec<A>::loadu(add + cb * V) : v).store(o + cb * block);
        }
        if (n > 0) {
          const Vec<A> v = Vec<A>::loadu(px + full * V, n);
          (add ? v + Vec<A>::loadu(add + full * V, n) : v).store(o + full * block);
        }
      }
    }
  }
};

// in[j] = the N vectors from p on.
template <typename A, int64_t N>
inline void load_row(const A* p, Vec<A>* in) {
#pragma GCC unroll 16
  for (int64_t j = 0; j < N; ++j) in[j] = Vec<A>::loadu(p + j * Vec<A>::size());
}

// acc[j] += sum over kx < K of w[kx] * in[j + kx]: one kernel row's taps for SW outputs; w: K
// vectors.
template <typename A, int K, int64_t SW>
inline void row_taps(const Vec<A>* in, const A* w, Vec<A>* acc) {
#pragma GCC unroll 7
  for (int64_t kx = 0; kx < K; ++kx) {
    const Vec<A> wk = Vec<A>::loadu(w + kx * Vec<A>::size());
#pragma GCC unroll 16
    for (int64_t j = 0; j < SW; ++j) acc[j] = at::vec::fmadd(in[j + kx], wk, acc[j]);
  }
}

// acc[j] = init + sum over taps t of w[t] * (the band at pixel j + tap t's offset), for SW
// consecutive pixels of one row; win: the band at the window's top-left corner, pw vectors per
// row. For a kernel size known at compile time, each kernel row's SW + k - 1 input vectors are
// loaded into registers once and feed all k of its taps.
template <typename A, int K, int64_t SW>
inline void depthwise_strip(const A* win, int64_t pw, int64_t k_rt, const A* wv, const Vec<A>& init, Vec<A>* out) {
  constexpr int64_t V = Vec<A>::size();
  Vec<A> acc[SW];
#pragma GCC unroll 16
  for (int64_t j = 0; j < SW; ++j) acc[j] = init;
  if constexpr (K > 0) {
    for (int64_t ky = 0; ky < K; ++ky) {
      Vec<A> in[SW + K - 1];
      load_row<A, SW + K - 1>(win + ky * pw * V, in);
      row_taps<A, K, SW>(in, wv + ky * K * V, acc);
    }
  } else {
    for (int64_t ky = 0; ky < k_rt; ++ky) {
      for (int64_t kx = 0; kx < k_rt; ++kx) {
        const Vec<A> w = Vec<A>::loadu(wv + (ky * k_rt + kx) * V);
        const A* r = win + (ky * pw + kx) * V;
#pragma GCC unroll 16
        for (int64_t j = 0; j < SW; ++j) acc[j] = at::vec::fmadd(Vec<A>::loadu(r + j * V), w, acc[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int64_t j = 0; j < SW; ++j) out[j] = acc[j];
}

// The same for two output rows at once (out0: the row at win + pad rows, out1: the one below).
// Each input row is loaded once for both, and 2 SW independent sums keep both FMA pipes busy,
// where SW sums of 49 dependent FMAs each would wait on the FMA latency.
template <typename A, int K, int64_t SW>
inline void depthwise_strip2(const A* win, int64_t pw, const A* wv, const Vec<A>& init, Vec<A>* out0,
                             Vec<A>* out1) {
  constexpr int64_t V = Vec<A>::size();
  Vec<A> acc0[SW], acc1[SW];
#pragma GCC unroll 16
  for (int64_t j = 0; j < SW; ++j) acc0[j] = acc1[j] = init;
#pragma GCC unroll 1
  for (int64_t r = 0; r <= K; ++r) {
    Vec<A> in[SW + K - 1];
    load_row<A, SW + K - 1>(win + r * pw * V, in);
    // Tap by tap for both rows: the two sums' FMAs interleave.
#pragma GCC unroll 7
    for (int64_t kx = 0; kx < K; ++kx) {
      if (r < K) {
        const Vec<A> w = Vec<A>::loadu(wv + (r * K + kx) * V);
#pragma GCC unroll 16
        for (int64_t j = 0; j < SW; ++j) acc0[j] = at::vec::fmadd(in[j + kx], w, acc0[j]);
      }
      if (r > 0) {
        const Vec<A> w = Vec<A>::loadu(wv + ((r - 1) * K + kx) * V);
#pragma GCC unroll 16
        for (int64_t j = 0; j < SW; ++j) acc1[j] = at::vec::fmadd(in[j + kx], w, acc1[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int64_t j = 0; j < SW; ++j) {
    out0[j] = acc0[j];
    out1[j] = acc1[j];
  }
}

// The depthwise kernel w [S, taps] as the strips read it: for each block of V channels, its tap
// vectors in a row ([ceil(S / V), taps, V], lanes past S zero), one contiguous stream per block.
// Each thread makes its own copy once per call, in its scratch memory, so that it sits in that
// thread's cache. flipped: taps in reverse order (backward's transposed convolution).
template <typename A>
const A* block_major_taps(const A* w, int64_t S, int64_t taps, bool flipped) {
  constexpr int64_t V = Vec<A>::size();
  const int64_t blocks = (S + V - 1) / V;
  A* out = scratch<A>(kDwTaps, blocks * taps * V);
  for (int64_t cb = 0; cb < blocks; ++cb) {
    A* block = out + cb * taps * V;
    const int64_t n = std::min(V, S - cb * V);
    if (n < V) std::fill(block, block + taps * V, A(0));
    transpose<A>(w + cb * V * taps, taps, n, taps, block, V);
    if (flipped) {
      for (int64_t t = 0; t < taps / 2; ++t) {
        std::swap_ranges(block + t * V, block + (t + 1) * V, block + (taps - 1 - t) * V);
      }
    }
  }
  return out;
}

// One depthwise conv over rows [y0, y1) of one image:
//   dst[pixel, c] = scale * (bias[c] + sum_t w[t, c] q[pixel + o_t, c]), c < S,
// q = src + add inside the map (add may be null) and zero outside. src: the image's pixel 0,
// ld_src apart; w: block_major_taps; bias may be null; dst: pixel (y0, 0), ld_dst apart.
// With gate_channels > 0, the forward's first gate is applied as the sums leave the registers:
// for the whole blocks of V channels below gate_channels, dst is not written, and
//   gate_y[pixel, c] = dst value * (gate_p[pixel, c] + gate_bias[c])
// is instead (gate_p and gate_y at pixel (y0, 0), gate_ld_p and gate_ld_y apart).
template <typename A>
struct DwArgs {
  const A* src;
  int64_t ld_src;
  const A* add;
  const A* w;
  const A* bias;
  A scale;
  int64_t S, y0, y1;
  A* dst;
  int64_t ld_dst;
  int64_t gate_channels = 0;
  const A* gate_p = nullptr;
  int64_t gate_ld_p = 0;
  const A* gate_bias = nullptr;
  A* gate_y = nullptr;
  int64_t gate_ld_y = 0;

  // The channels whose first gate the conv applies: whole blocks of V.
  int64_t gated() const { return gate_channels / Vec<A>::size() * Vec<A>::size(); }
};

// K: the kernel size when known at compile time (0: g.k), so that the tap loops unroll; SW the
// strip width.
template <typename A, int K, int64_t SW>
void depthwise_impl(const DwArgs<A>& a, const DwGeometry& g) {
  constexpr int64_t V = Vec<A>::size();
  const int64_t k = K > 0 ? K : g.k, y0 = a.y0, y1 = a.y1;
  const Vec<A> vs(a.scale);
  for (int64_t c = 0; c < a.S; c += V) {
    const int64_t n = std::min(V, a.S - c);
    // One block at a time: the packed copy stays small enough to leave the source in cache.
    PackedBand<A> band(g, n, y0, y1, k / 2, kBand, SW);
    band.pack(a.src + c, a.ld_src, g, n, a.add ? a.add + c : nullptr);
    const A* wv = a.w + c * k * k;
    const Vec<A> init = a.bias ? load_n(a.bias + c, n) : Vec<A>(A(0));
    const bool gated = c < a.gated();
    const Vec<A> gate_bias = gated ? Vec<A>::loadu(a.gate_bias + c) : Vec<A>(A(0));
    // Output pixel i (from (y0, 0) on) of this block.
    const auto put = [&](int64_t i, const Vec<A>& v) {
      if (gated) {
        (v * vs * (Vec<A>::loadu(a.gate_p + i * a.gate_ld_p + c) + gate_bias)).store(a.gate_y + i * a.gate_ld_y + c);
      } else {
        store_n<A>(v * vs, a.dst + i * a.ld_dst + c, n);
      }
    };
    int64_t y = y0;
    if constexpr (K > 0) {
      for (; y + 1 < y1; y += 2) {
        const int64_t row = (y - y0) * g.W;
        for (int64_t s = 0; s < band.strips; ++s) {
          const int64_t x0 = s * SW, m = std::min(SW, g.W - x0);
          Vec<A> acc0[SW], acc1[SW];
          depthwise_strip2<A, K, SW>(band.at(0, y - k / 2, x0 - k / 2), band.pw, wv, init, acc0, acc1);
          for (int64_t j = 0; j < m; ++j) {
            put(row + x0 + j, acc0[j]);
            put(row + g.W + x0 + j, acc1[j]);
          }
        }
      }
    }
    for (; y < y1; ++y) {
      const int64_t row = (y - y0) * g.W;
      for (int64_t s = 0; s < band.strips; ++s) {
        const int64_t x0 = s * SW, m = std::min(SW, g.W - x0);
        Vec<A> acc[SW];
        depthwise_strip<A, K, SW>(band.at(0, y - k / 2, x0 - k / 2), band.pw, k, wv, init, acc);
        for (int64_t j = 0; j < m; ++j) put(row + x0 + j, acc[j]);
      }
    }
  }
}

template <typename A, int64_t SW>
void depthwise_sw(const DwArgs<A>& a, const DwGeometry& g) {
  switch (g.k) {
    case 7: return depthwise_impl<A, 7, SW>(a, g);
    case 5: return depthwise_impl<A, 5, SW>(a, g);
    case 3: return depthwise_impl<A, 3, SW>(a, g);
    default: return depthwise_impl<A, 0, SW>(a, g);
  }
}

template <typename A>
void depthwise(const DwArgs<A>& a, const DwGeometry& g) {
  if constexpr (kStripAlt != kStrip) {
    if (g.W % kStrip != 0 && g.W % kStripAlt == 0) return depthwise_sw<A, kStripAlt>(a, g);
  }
  depthwise_sw<A, kStrip>(a, g);
}

// gw[t, c] += sum over pixels p of rows [y0, y1): dy[p, c] * q[p + o_t, c], q = src + add inside
// the map (add may be null) and zero outside. dy and src: the image's pixel 0, ld_dy / ld_src apart; gw [k * k, S].
// For one kernel row, the k taps' sums stay in registers while x runs along the rows.
template <typename A, int K>
void depthwise_weight_grad_impl(const A* src, int64_t ld_src, const A* add, const A* dy, int64_t ld_dy, int64_t S,
                                const DwGeometry& g, int64_t y0, int64_t y1, A* gw) {
  constexpr int64_t V = Vec<A>::size();
  constexpr int64_t kMaxK = K > 0 ? K : kMaxKernel;
  const int64_t k = K > 0 ? K : g.k, pad = k / 2;
  PackedBand<A> band(g, S, y0, y1, pad, kBand);
  PackedBand<A> grad(g, S, y0, y1, 0, kGradBand);
  band.pack(src, ld_src, g, S, add);
  grad.pack(dy, ld_dy, g, S, nullptr);
  for (int64_t c = 0; c < S; c += V) {
    const int64_t n = std::min(V, S - c), cb = c / V;
    for (int64_t ky = 0; ky < k; ++ky) {
      Vec<A> acc[kMaxK];
      for (int64_t kx = 0; kx < k; ++kx) acc[kx] = Vec<A>(A(0));
      for (int64_t y = y0; y < y1; ++y) {
        const A* srow = band.at(cb, y + ky - pad, -pad);
        const A* drow = grad.at(cb, y, 0);
        for (int64_t x = 0; x < g.W; ++x) {
          const Vec<A> d = Vec<A>::loadu(drow + x * V);
#pragma GCC unroll 8
          for (int64_t kx = 0; kx < k; ++kx) acc[kx] = at::vec::fmadd(d, Vec<A>::loadu(srow + (x + kx) * V), acc[kx]);
        }
      }
      for (int64_t kx = 0; kx < k; ++kx) {
        A* out = gw + (ky * k + kx) * S + c;
        store_n<A>(load_n(out, n) + acc[kx], out, n);
      }
    }
  }
}

template <typename A>
void depthwise_weight_grad(const A* src, int64_t ld_src, const A* add, const A* dy, int64_t ld_dy, int64_t S,
                           const DwGeometry& g, int64_t y0, int64_t y1, A* gw) {
  switch (g.k) {
    case 7: return depthwise_weight_grad_impl<A, 7>(src, ld_src, add, dy, ld_dy, S, g, y0, y1, gw);
    case 5: return depthwise_weight_grad_impl<A, 5>(src, ld_src, add, dy, ld_dy, S, g, y0, y1, gw);
    case 3: return depthwise_weight_grad_impl<A, 3>(src, ld_src, add, dy, ld_dy, S, g, y0, y1, gw);
    default: return depthwise_weight_grad_impl<A, 0>(src, ld_src, add, dy, ld_dy, S, g, y0, y1, gw);
  }
}

// out[r, c] = sum over pixels p < np, in order, of a[p, r] * b[p, c] for r < R, c < N: a weight
// gradient over one tile. Element (p, r) of a at a + p * a_p + r * a_r, row p of b at b + p * ldb,
// element (r, c) of out at out + r * o_r + c * o_c. Not the BLAS: MKL's result for a reduction
// this long can change with the thread that calls it, and the gradients must not depend on the
// thread count. 4 rows x 4 vectors of sums stay in registers.
template <typename A>
void weight_grad(int64_t np, int64_t R, int64_t N, const A* a, int64_t a_p, int64_t a_r, const A* b, int64_t ldb,
                 A* out, int64_t o_r, int64_t o_c) {
  constexpr int64_t V = Vec<A>::size(), RB = 4, CB = 4;
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t rn = std::min(RB, R - r0);
    for (int64_t c0 = 0; c0 < N; c0 += CB * V) {
      const int64_t cn = std::min(CB * V, N - c0);
      Vec<A> acc[RB][CB];
      for (auto& row : acc) {
        for (auto& v : row) v = Vec<A>(A(0));
      }
      // Whole 4 x 4 blocks with trip counts the compiler knows; edge blocks with masked loads.
      const auto sweep = [&](auto whole) {
        constexpr bool kWhole = decltype(whole)::value;
        const int64_t rows = kWhole ? RB : rn;
        for (int64_t p = 0; p < np; ++p) {
          const A* bp = b + p * ldb + c0;
          const A* ap = a + p * a_p + r0 * a_r;
          Vec<A> bv[CB];
#pragma GCC unroll 4
          for (int64_t j = 0; j < CB; ++j) {
            bv[j] = kWhole ? Vec<A>::loadu(bp + j * V)
                           : j * V < cn ? load_n(bp + j * V, std::min(V, cn - j * V)) : Vec<A>(A(0));
          }
#pragma GCC unroll 4
          for (int64_t i = 0; i < rows; ++i) {
            const Vec<A> av(ap[i * a_r]);
#pragma GCC unroll 4
            for (int64_t j = 0; j < CB; ++j) acc[i][j] = at::vec::fmadd(av, bv[j], acc[i][j]);
          }
        }
      };
      if (rn == RB && cn == CB * V) {
        sweep(std::true_type{});
      } else {
        sweep(std::false_type{});
      }
      for (int64_t i = 0; i < rn; ++i) {
        for (int64_t j = 0; j < CB && j * V < cn; ++j) {
          const int64_t n = std::min(V, cn - j * V);
          A* o = out + (r0 + i) * o_r + (c0 + j * V) * o_c;
          if (o_c == 1) {
            store_n<A>(acc[i][j], o, n);
          } else {
            A tmp[V];
            acc[i][j].store(tmp);
            for (int64_t e = 0; e < n; ++e) o[e * o_c] = tmp[e];
          }
        }
      }
    }
  }
}

// ---- the pws steps: a register-blocked GEMM with the gate in its epilogue -----------------------
//
// y_i = (y_{i-1} W_i^T + b_i) * g_i over a tile's pixels. The widths are narrow (dim / 2^(n-i)):
// through the BLAS, each tile's GEMM re-packed W_i, and its output made one more trip through
// memory for the gate. Here each thread packs W_i once per call into panels of kGemmCols
// vectors of output channels, [panel][k][kGemmCols * V] (zero past N); kGemmRows rows x
// kGemmCols vectors of sums stay in registers, summed in k order, so that a row's bits do not
// depend on the tile it is in; the bias and the gate are applied as the sums leave the registers.

// The panels of W [N, K] (row-major) at dst; returns the floats they take.
template <typename A>
int64_t pack_panels(const A* w, int64_t N, int64_t K, A* dst) {
  constexpr int64_t NR = kGemmCols * Vec<A>::size();
  const int64_t panels = (N + NR - 1) / NR;
  if (dst != nullptr) {
    for (int64_t p = 0; p < panels; ++p) {
      A* panel = dst + p * K * NR;
      const int64_t rows = std::min(NR, N - p * NR);
      if (rows < NR) std::fill(panel, panel + K * NR, A(0));
      transpose<A>(w + p * NR * K, K, rows, K, panel, NR);
    }
  }
  return panels * K * NR;
}

// Where a gated GEMM's rows go: dst[m, :N] = (sums + bias) * g[m, :N] and, when z is not null,
// the pre-gate value z[m, :N] = sums + bias (backward keeps it).
template <typename A>
struct GatedOut {
  const A* bias;
  const A* g;
  int64_t ldg;
  A* dst;
  int64_t ldd;
  A* z = nullptr;
  int64_t ldz = 0;

  // The same from row m and column n on.
  GatedOut at(int64_t m, int64_t n) const {
    return GatedOut{bias + n, g + m * ldg + n, ldg, dst + m * ldd + n, ldd, z ? z + m * ldz + n : nullptr, ldz};
  }
};

// One register block: Rows rows of a (lda apart) times one panel, whose first N <= kGemmCols * V
// columns are kept, into o's rows [0, Rows).
template <typename A, int64_t Rows>
inline void gated_block(int64_t K, const A* a, int64_t lda, const A* panel, int64_t N, const GatedOut<A>& o) {
  constexpr int64_t V = Vec<A>::size(), NR = kGemmCols * V;
  Vec<A> acc[Rows][kGemmCols];
#pragma GCC unroll 8
  for (int64_t i = 0; i < Rows; ++i) {
#pragma GCC unroll 4
    for (int64_t j = 0; j < kGemmCols; ++j) acc[i][j] = Vec<A>(A(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec<A> bv[kGemmCols];
#pragma GCC unroll 4
    for (int64_t j = 0; j < kGemmCols; ++j) bv[j] = Vec<A>::loadu(panel + k * NR + j * V);
#pragma GCC unroll 8
    for (int64_t i = 0; i < Rows; ++i) {
      const Vec<A> av(a[i * lda + k]);
#pragma GCC unroll 4
      for (int64_t j = 0; j < kGemmCols; ++j) acc[i][j] = at::vec::fmadd(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int64_t j = 0; j < kGemmCols; ++j) {
    const int64_t n = std::min(V, N - j * V);
    if (n <= 0) break;
    const Vec<A> b = load_n(o.bias + j * V, n);
#pragma GCC unroll 8
    for (int64_t i = 0; i < Rows; ++i) {
      const Vec<A> z = acc[i][j] + b;
      if (o.z != nullptr) store_n<A>(z, o.z + i * o.ldz + j * V, n);
      store_n<A>(z * load_n(o.g + i * o.ldg + j * V, n), o.dst + i * o.ldd + j * V, n);
    }
  }
}

// o's rows [0, M) from a [M, K] (lda apart) and W [N, K], packed by pack_panels.
template <typename A>
void gated_gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t lda, const A* panels, const GatedOut<A>& o) {
  constexpr int64_t NR = kGemmCols * Vec<A>::size();
  for (int64_t n0 = 0; n0 < N; n0 += NR) {
    const A* panel = panels + (n0 / NR) * K * NR;
    const int64_t nn = std::min(NR, N - n0);
    for (int64_t m = 0; m < M; m += kGemmRows) {
      const A* am = a + m * lda;
      const GatedOut<A> om = o.at(m, n0);
      // The last rows in a block of their own size: the same k-ordered sums as a full block.
      switch (std::min(kGemmRows, M - m)) {
#if defined(CPU_CAPABILITY_AVX512)
        case 6: gated_block<A, 6>(K, am, lda, panel, nn, om); break;
        case 5: gated_block<A, 5>(K, am, lda, panel, nn, om); break;
#endif
        case 4: gated_block<A, 4>(K, am, lda, panel, nn, om); break;
        case 3: gated_block<A, 3>(K, am, lda, panel, nn, om); break;
        case 2: gated_block<A, 2>(K, am, lda, panel, nn, om); break;
        default: gated_block<A, 1>(K, am, lda, panel, nn, om); break;
      }
    }
  }
}

// A thread's panels of every W_i (i = 1 .. order - 1) for the call: panel(i).
template <typename A>
class ChainPanels {
  std::vector<const A*> at_;

 public:
  template <class W>
  ChainPanels(const W& w, const Layout& L) : at_(L.order, nullptr) {
    int64_t size = 0;
    for (int64_t i = 1; i < L.order; ++i) size += pack_panels<A>(nullptr, L.dims[i], L.dims[i - 1], nullptr);
    A* panels = scratch<A>(kPanels, size);
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

// A contiguous range of tiles [front, back) that its owner takes from the front and other
// threads from the back; both ends live in one atomic word.
class TileShare {
  std::atomic<uint64_t> ends{0};
  static uint64_t pack(uint64_t front, uint64_t back) { return front << 32 | back; }

 public:
  void reset(int64_t front, int64_t back) {
    TORCH_INTERNAL_ASSERT(0 <= front && front <= back && back < (int64_t(1) << 32));
    ends.store(pack(front, back));
  }
  int64_t left() const {
    const uint64_t e = ends.load(std::memory_order_relaxed);
    return static_cast<int64_t>(e & 0xffffffffu) - static_cast<int64_t>(e >> 32);
  }
  // The tile taken, or -1 when none is left.
  int64_t take_front() {
    uint64_t e = ends.load();
    for (;;) {
      const uint64_t front = e >> 32, back = e & 0xffffffffu;
      if (front >= back) return -1;
      if (ends.compare_exchange_weak(e, pack(front + 1, back))) return static_cast<int64_t>(front);
    }
  }
  int64_t take_back() {
    uint64_t e = ends.load();
    for (;;) {
      const uint64_t front = e >> 32, back = e & 0xffffffffu;
      if (front >= back) return -1;
      if (ends.compare_exchange_weak(e, pack(front, back - 1))) return static_cast<int64_t>(back - 1);
    }
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

  // Runs make_worker()(t) on every tile t; make_worker() builds a thread's callable. Each thread
  // works through an even, contiguous share of the tiles in order (neighbouring bands share F's
  // rows), and one that runs out takes tiles from the end of the share with the most left, so
  // that a thread the machine slows down does not hold back the call. Tiles write disjoint
  // outputs and partials, so who runs a tile never changes a result.
  template <class MakeWorker>
  void for_each_tile(const MakeWorker& make_worker) const {
    const int64_t T = tiles.count;
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), T);
    if (workers <= 1) {
      auto work = make_worker();
      for (int64_t t = 0; t < T; ++t) work(t);
      return;
    }
    std::unique_ptr<TileShare[]> shares(new TileShare[workers]);
    for (int64_t i = 0; i < workers; ++i) shares[i].reset(i * T / workers, (i + 1) * T / workers);
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      auto work = make_worker();
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t t; (t = shares[i].take_front()) >= 0;) work(t);
      }
      for (;;) {
        int64_t victim = -1, most = 0;
        for (int64_t i = 0; i < workers; ++i) {
          const int64_t left = shares[i].left();
          if (left > most) {
            victim = i;
            most = left;
          }
        }
        if (victim < 0) break;
        const int64_t t = shares[victim].take_back();
        if (t >= 0) work(t);
      }
    });
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
      F = scratch<A>(kImageF, n);
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
    return [&, panel = ChainPanels<A>(call.w, L), taps = call.dw_taps(false), gbuf = scratch<A>(kGates, mp * L.S),
            ys = scratch<A>(kYs, mp * C),
            zs = scratch<A>(kZs, mp * C), proj = ImageProjection<scalar_t>(call)](int64_t t) mutable {
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
    return [&, panel = ChainPanels<A>(call.w, L), taps = call.dw_taps(false), gbuf = scratch<A>(kGates, mp * S),
            ys = scratch<A>(kYs, mp * S), zs = scratch<A>(kZs, mp * S), da = scratch<A>(kGradA, mp * C),
            db = scratch<A>(kGradB, mp * C)](int64_t t) {
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
    return [&, taps = call.dw_taps(true), dx = scratch<A>(kGradX, tiles.max_pixels() * C)](int64_t t) {
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

const CpuKernels& TM_CPU_KERNELS(gnconv)() {
  static const CpuKernels kernels{&forward, &backward};
  return kernels;
}

}  // namespace gnconv
}  // namespace tokenmix
