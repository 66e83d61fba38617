// The depthwise convolution of gnConv's CPU kernels: the gates' k x k conv (bias, scale and the
// first gate in its epilogue), its transpose (the flipped kernel) and its weight gradient, over
// bands of rows of one image, channels-last. Included only by gnconv_cpu.cpp; per capability, in
// tokenmix::gnconv::CPU_CAPABILITY (cpu/per_isa.h).
//
// Both kernels work one block of V channels at a time on a packed copy of the band's input rows
// (plus k/2 halo rows and columns of zeros). Reading the channels-last operands in place would
// step 2 dim or S floats between neighbouring pixels: a power-of-two stride that maps every load
// of a block to a few L1 sets. Packed, a k x k window is contiguous vectors and the zero border
// removes every bounds check from the tap loops. Kernel sizes 3, 5 and 7 are compile-time
// constants (unrolled tap loops, two output rows per pass); any other odd k <= kMaxKernel runs a
// generic loop.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "cpu/per_isa.h"
#include "cpu/rows.h"
#include "cpu/scratch.h"
#include "gnconv_math.h"

namespace tokenmix {
namespace gnconv {
inline namespace CPU_CAPABILITY {

using cpu::load_n;
using cpu::scratch;
using cpu::store_n;
using cpu::transpose;
using cpu::Vec;

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

// The calling thread's scratch buffers (cpu/scratch.h) of the depthwise kernels.
enum class DwSlot { kBand, kGradBand, kTaps, kCount };

// A band of rows [y0, y1) of S channels, zero-padded by pad on every side and on the right up to
// whole strips, stored block by block: element (y, x) of channel block cb at
// data + ((cb * rows + y - y0 + pad) * pw + x + pad) * V.
template <typename A>
struct PackedBand {
  static constexpr int64_t V = Vec<A>::size();
  int64_t y0, pad, pw, strips, rows, blocks;
  A* data;

  PackedBand(const DwGeometry& g, int64_t S, int64_t y0_, int64_t y1, int64_t pad_, DwSlot slot,
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
  A* out = scratch<A>(DwSlot::kTaps, blocks * taps * V);
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
    PackedBand<A> band(g, n, y0, y1, k / 2, DwSlot::kBand, SW);
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
  PackedBand<A> band(g, S, y0, y1, pad, DwSlot::kBand);
  PackedBand<A> grad(g, S, y0, y1, 0, DwSlot::kGradBand);
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

}  // namespace CPU_CAPABILITY
}  // namespace gnconv
}  // namespace tokenmix
