// Channel layout and depthwise-convolution geometry of HorNet's gnConv, shared by the CPU and CUDA
// kernels. No torch headers.
#pragma once

#include <cstdint>

#include "tokenmix/macros.h"

namespace tokenmix {
namespace gnconv {

constexpr int kMaxOrder = 8;
constexpr int64_t kMaxKernel = 31;  // largest depthwise kernel size

// dims[i] = dim / 2^(order-1-i): the widths of the recursive gating steps, narrowest first.
// proj_in emits 2 * dim channels: p0 (dims[0]) then the S = sum(dims) channels the depthwise conv
// turns into the gates g_0..g_{order-1}; gate i occupies channels [offs[i], offs[i] + dims[i]) of
// the S.
struct Layout {
  int64_t dim, order, S;
  int64_t dims[kMaxOrder];
  int64_t offs[kMaxOrder];

  TM_HOST_DEVICE static Layout make(int64_t dim, int64_t order) {
    Layout l{};
    l.dim = dim;
    l.order = order;
    int64_t off = 0;
    for (int64_t i = 0; i < order; ++i) {
      l.dims[i] = dim >> (order - 1 - i);
      l.offs[i] = off;
      off += l.dims[i];
    }
    l.S = off;
    return l;
  }
  // Width of the proj_in output: p0 plus the gate channels, 2 * dim.
  TM_HOST_DEVICE int64_t proj_width() const { return dims[0] + S; }
};

// "same" depthwise k x k convolution (padding k / 2) over an H x W map; tap t = ky * k + kx reads
// input pixel (y + ky - pad, x + kx - pad) for output pixel (y, x).
struct DwGeometry {
  int64_t H, W, k;

  TM_HOST_DEVICE int64_t pad() const { return k / 2; }
  TM_HOST_DEVICE int64_t taps() const { return k * k; }
  // First and one-past-last kernel row (or column) whose input row (column) lies inside [0, n).
  TM_HOST_DEVICE int64_t tap_lo(int64_t pos) const {
    const int64_t lo = pad() - pos;
    return lo > 0 ? lo : 0;
  }
  TM_HOST_DEVICE int64_t tap_hi(int64_t pos, int64_t n) const {
    const int64_t hi = n - pos + pad();
    return hi < k ? hi : k;
  }
};

// Strip blocking of the depthwise convolution for K in {3, 5, 7}: one work item is R consecutive
// outputs (y, x0 .. x0 + R - 1) of one channel, so each input of the K rows it reads is loaded
// once and reused by every tap that needs it (R + K - 1 loads per row instead of R * K).
// Items are numbered (b, y, strip, c) with c fastest: neighbouring items (threads) read
// neighbouring channels of the same pixels.
struct DwStrip {
  int64_t b, y, x0, c;
};

template <int R>
TM_HOST_DEVICE int64_t dw_strips_per_row(const DwGeometry& g) {
  return (g.W + R - 1) / R;
}

template <int R>
TM_HOST_DEVICE DwStrip dw_strip(const DwGeometry& g, int64_t S, int64_t item) {
  DwStrip s;
  s.c = item % S;
  item /= S;
  const int64_t strips = dw_strips_per_row<R>(g);
  s.x0 = (item % strips) * R;
  item /= strips;
  s.y = item % g.H;
  s.b = item / g.H;
  return s;
}

// row[j] = in(sy, x0 + j - pad) for the R + K - 1 inputs a strip's taps read from input row sy,
// zero outside the map.
template <int K, int R, typename A, typename In>
TM_HOST_DEVICE void load_strip_row(const DwGeometry& g, int64_t sy, int64_t x0, const In& in,
                                   A (&row)[R + K - 1]) {
  TM_UNROLL
  for (int j = 0; j < R + K - 1; ++j) {
    const int64_t sx = x0 + j - K / 2;
    row[j] = (sx >= 0 && sx < g.W) ? in(sy, sx) : A(0);
  }
}

// acc[r] += sum over the taps inside the map of w(t) * in(y + ky - pad, x0 + r + kx - pad), with
// t = ky * K + kx. Outputs past the row's end (x0 + r >= W) are computed from zeros and not meant
// to be stored. `in(sy, sx)` is only called inside the map.
template <int K, int R, typename A, typename In, typename Wt>
TM_HOST_DEVICE void depthwise_strip(const DwGeometry& g, int64_t y, int64_t x0, const In& in,
                                    const Wt& w, A (&acc)[R]) {
  constexpr int pad = K / 2;
  // Rows stay rolled: unrolled, the compiler hoists all K * (R + K - 1) loads and the register
  // count (about 170 for K = 7) leaves one block per multiprocessor.
  TM_NO_UNROLL
  for (int ky = 0; ky < K; ++ky) {
    const int64_t sy = y + ky - pad;
    if (sy < 0 || sy >= g.H) continue;
    A row[R + K - 1];
    load_strip_row<K, R>(g, sy, x0, in, row);
    TM_UNROLL
    for (int kx = 0; kx < K; ++kx) {
      const A wt = w(ky * K + kx);
      TM_UNROLL
      for (int r = 0; r < R; ++r) acc[r] += wt * row[r + kx];
    }
  }
}

// Weight gradient of kernel row ky over one strip: part[kx] += sum_r dy(x0 + r) *
// in(y + ky - pad, x0 + r + kx - pad), dy being output row y. Nothing when that input row is
// outside the map; `dy(x)` and `in(sy, sx)` are only called inside it.
template <int K, int R, typename A, typename Dy, typename In>
TM_HOST_DEVICE void depthwise_grad_strip(const DwGeometry& g, int64_t y, int64_t x0, int ky,
                                         const Dy& dy, const In& in, A (&part)[K]) {
  constexpr int pad = K / 2;
  const int64_t sy = y + ky - pad;
  if (sy < 0 || sy >= g.H) return;
  A d[R];
  TM_UNROLL
  for (int r = 0; r < R; ++r) d[r] = x0 + r < g.W ? dy(x0 + r) : A(0);
  A row[R + K - 1];
  load_strip_row<K, R>(g, sy, x0, in, row);
  TM_UNROLL
  for (int kx = 0; kx < K; ++kx) {
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      if (x0 + r >= g.W) break;  // zero pad beside a possibly non-finite input
      part[kx] += d[r] * row[r + kx];
    }
  }
}

// One work item of the strip-blocked depthwise conv: acc = bias + the strip's taps, then
// out(pixel, acc) for each of its outputs inside the row (pixel = (b * H + y) * W + x).
// in(b, sy, sx) reads the input, w(t) the weight of tap t (already flipped if need be).
template <int K, int R, typename A, typename In, typename Wt, typename Out>
TM_HOST_DEVICE void depthwise_item(const DwGeometry& g, const DwStrip& s, A bias, const In& in,
                                   const Wt& w, const Out& out) {
  A acc[R];
  TM_UNROLL
  for (int r = 0; r < R; ++r) acc[r] = bias;
  const auto in_b = [&](int64_t sy, int64_t sx) { return in(s.b, sy, sx); };
  depthwise_strip<K, R>(g, s.y, s.x0, in_b, w, acc);
  TM_UNROLL
  for (int r = 0; r < R; ++r) {
    if (s.x0 + r >= g.W) break;
    out((s.b * g.H + s.y) * g.W + s.x0 + r, acc[r]);
  }
}

// Rows [lo, hi) of the B * H output rows that weight-gradient chunk `chunk` of `chunks` sums.
TM_HOST_DEVICE void dw_chunk_rows(int64_t rows, int64_t chunks, int64_t chunk, int64_t* lo,
                                  int64_t* hi) {
  const int64_t per = (rows + chunks - 1) / chunks;
  *lo = chunk * per < rows ? chunk * per : rows;
  *hi = *lo + per < rows ? *lo + per : rows;
}

// Weight-gradient work item (chunk, ky, c), c fastest: neighbouring threads, neighbouring channels.
struct DwGradItem {
  int64_t chunk, ky, c;
};

template <int K>
TM_HOST_DEVICE DwGradItem dw_grad_item(int64_t S, int64_t item) {
  DwGradItem i;
  i.c = item % S;
  i.ky = (item / S) % K;
  i.chunk = item / (S * K);
  return i;
}

// part[kx] = sum over the chunk's output rows and every x of dy(row, x) * in(b, y + ky - pad,
// x + kx - pad): kernel row ky of one channel's weight gradient, in a fixed order.
template <int K, int R, typename A, typename Dy, typename In>
TM_HOST_DEVICE void depthwise_grad_item(const DwGeometry& g, int64_t B, int64_t chunks,
                                        const DwGradItem& it, const Dy& dy, const In& in,
                                        A (&part)[K]) {
  TM_UNROLL
  for (int kx = 0; kx < K; ++kx) part[kx] = A(0);
  int64_t lo, hi;
  dw_chunk_rows(B * g.H, chunks, it.chunk, &lo, &hi);
  for (int64_t row = lo; row < hi; ++row) {
    const int64_t b = row / g.H, y = row % g.H;
    const auto dy_row = [&](int64_t x) { return dy(row, x); };
    const auto in_b = [&](int64_t sy, int64_t sx) { return in(b, sy, sx); };
    for (int64_t x0 = 0; x0 < g.W; x0 += R) {
      depthwise_grad_strip<K, R>(g, y, x0, static_cast<int>(it.ky), dy_row, in_b, part);
    }
  }
}

// ---- Channel-vectorised strip blocking (the CUDA strip kernels) ----------------------------------
// A work item is R consecutive outputs (y, x0 .. x0 + R - 1) of V consecutive channels c0 ..
// c0 + V - 1 (one vector load of the element type, or V = 1), numbered (b, y, strip, group) with
// the channel group fastest. Each tap still sums in the order of depthwise_strip: bias, then kernel
// rows, then kernel columns, so every channel's result is the same as with V = 1.

// Whether the V-channel path can run: every channel row (and the gated channels) splits into whole
// groups, and every row stride in lds is a multiple of V, so each group starts on a V-element
// boundary of its row. The caller checks that the base pointers are aligned to V elements.
TM_HOST_DEVICE bool dw_vector_ok(int64_t V, int64_t S, int64_t gate_channels,
                                 const int64_t* lds, int n_lds) {
  if (S % V != 0 || gate_channels % V != 0) return false;
  for (int i = 0; i < n_lds; ++i) {
    if (lds[i] % V != 0) return false;
  }
  return true;
}

// 32-bit decomposition of a work item (the caller guarantees items < 2^31 and B * H < 2^31, so
// nothing here needs 64-bit division); c is the first channel of the group.
template <int R>
TM_HOST_DEVICE DwStrip dw_vec_strip(const DwGeometry& g, uint32_t groups, uint32_t V, uint32_t item) {
  const uint32_t strips = static_cast<uint32_t>(dw_strips_per_row<R>(g));
  const uint32_t H = static_cast<uint32_t>(g.H);
  DwStrip s;
  s.c = static_cast<int64_t>(item % groups) * V;
  item /= groups;
  s.x0 = static_cast<int64_t>(item % strips) * R;
  item /= strips;
  s.y = item % H;
  s.b = item / H;
  return s;
}

// The vector helpers take the operands through `fetch` callables returning one pixel's V channels
// raw (a trivially copyable pack whose value-initialised state is all zero bits, read as 0.0) and
// one `cvt(pack, vals)` that widens a pack to V accumulator values. Loading raw first and widening
// afterwards keeps the loads of a row free of branches (out-of-map pixels are a predicated-off load
// of a zero pack), so they are all in flight before the first use.

// row[j][v] = in(sy, x0 + j - pad)[v] for the R + K - 1 inputs of one input row, zero outside the
// map; `fetch(sy, sx)` is only called inside it.
template <int K, int R, int V, typename A, typename Fetch, typename Cvt>
TM_HOST_DEVICE void load_vec_row(const DwGeometry& g, int64_t sy, int64_t x0, const Fetch& fetch,
                                 const Cvt& cvt, A (&row)[R + K - 1][V]) {
  using P = decltype(fetch(sy, x0));
  P raw[R + K - 1];
  TM_UNROLL
  for (int j = 0; j < R + K - 1; ++j) {
    const int64_t sx = x0 + j - K / 2;
    raw[j] = (sx >= 0 && sx < g.W) ? fetch(sy, sx) : P{};
  }
  TM_UNROLL
  for (int j = 0; j < R + K - 1; ++j) cvt(raw[j], row[j]);
}

// One V-channel work item: acc = bias, then for each kernel row inside the map, each kernel column,
// acc[r][v] += w(t)[v] * in(y + ky - pad, x0 + r + kx - pad)[v]; then out(pixel, acc[r]) for each
// output inside the row (pixel = (b * H + y) * W + x). fetch_in(row, sx) takes the global input row
// b * H + sy; fetch_w(t) the V weights of tap t (already flipped if need be).
template <int K, int R, int V, typename A, typename FetchIn, typename FetchW, typename Cvt,
          typename Out>
TM_HOST_DEVICE void depthwise_vec_item(const DwGeometry& g, const DwStrip& s, const A (&bias)[V],
                                       const FetchIn& fetch_in, const FetchW& fetch_w,
                                       const Cvt& cvt, const Out& out) {
  constexpr int pad = K / 2;
  A acc[R][V];
  TM_UNROLL
  for (int r = 0; r < R; ++r) {
    TM_UNROLL
    for (int v = 0; v < V; ++v) acc[r][v] = bias[v];
  }
  const int64_t row0 = s.b * g.H;
  // Rolled for the same reason as depthwise_strip: unrolled rows would hoist K rows of loads.
  TM_NO_UNROLL
  for (int ky = 0; ky < K; ++ky) {
    const int64_t sy = s.y + ky - pad;
    if (sy < 0 || sy >= g.H) continue;
    using P = decltype(fetch_w(0));
    P wraw[K];
    TM_UNROLL
    for (int kx = 0; kx < K; ++kx) wraw[kx] = fetch_w(ky * K + kx);
    A row[R + K - 1][V];
    load_vec_row<K, R, V>(g, row0 + sy, s.x0, fetch_in, cvt, row);
    TM_UNROLL
    for (int kx = 0; kx < K; ++kx) {
      A wt[V];
      cvt(wraw[kx], wt);
      TM_UNROLL
      for (int r = 0; r < R; ++r) {
        TM_UNROLL
        for (int v = 0; v < V; ++v) acc[r][v] += wt[v] * row[r + kx][v];
      }
    }
  }
  TM_UNROLL
  for (int r = 0; r < R; ++r) {
    if (s.x0 + r >= g.W) break;
    out((row0 + s.y) * g.W + s.x0 + r, acc[r]);
  }
}

// Weight-gradient work item of the V-channel kernel: items are numbered (chunk, block of G channel
// groups, ky, group within the block), the last fastest. A warp then covers a few kernel rows of
// G neighbouring groups: every input row it reads is G * V contiguous channels (whole sectors for
// G * V * sizeof(T) = 64 or 128 bytes), and the kernel rows that read the same dy vectors share
// one load instruction. c is the group's first channel; valid is false for the padding items past
// the last group of a partial block. 32-bit, as dw_vec_strip.
template <int K, int G>
TM_HOST_DEVICE DwGradItem dw_vec_grad_item(uint32_t groups, uint32_t V, uint32_t item, bool* valid) {
  const uint32_t blocks = (groups + G - 1) / G;
  DwGradItem i;
  const uint32_t in_block = item % G;
  item /= G;
  i.ky = item % K;
  item /= K;
  const uint32_t group = (item % blocks) * G + in_block;
  i.chunk = item / blocks;
  i.c = static_cast<int64_t>(group) * V;
  *valid = group < groups;
  return i;
}

// Number of dw_vec_grad_item items for `chunks` chunks.
template <int K, int G>
TM_HOST_DEVICE int64_t dw_vec_grad_items(int64_t groups, int64_t chunks) {
  return chunks * ((groups + G - 1) / G) * K * G;
}

// Rows [lo, hi) of dw_chunk_rows in 32-bit arithmetic (rows < 2^31).
TM_HOST_DEVICE void dw_chunk_rows32(uint32_t rows, uint32_t chunks, uint32_t chunk, uint32_t* lo,
                                    uint32_t* hi) {
  const uint32_t per = (rows + chunks - 1) / chunks;
  const uint64_t start = static_cast<uint64_t>(chunk) * per;
  *lo = start < rows ? static_cast<uint32_t>(start) : rows;
  *hi = rows - *lo > per ? *lo + per : rows;
}

// part[kx][v] = sum over the chunk's output rows, then x ascending, of dy(row, x)[v] *
// in(row', x + kx - pad)[v], row' being the input row ky - pad below output row `row` in the same
// image: kernel row ky of V channels' weight gradient, in the same order as depthwise_grad_item
// (so the same fp32 sums). fetch_dy(row, x) and fetch_in(row', sx) take global row indices
// (b * H + y) and are only called inside the map. The row within the image advances by a counter:
// no division per row.
template <int K, int R, int V, typename A, typename FetchDy, typename FetchIn, typename Cvt>
TM_HOST_DEVICE void depthwise_vec_grad_item(const DwGeometry& g, int64_t B, int64_t chunks,
                                            const DwGradItem& it, const FetchDy& fetch_dy,
                                            const FetchIn& fetch_in, const Cvt& cvt,
                                            A (&part)[K][V]) {
  constexpr int pad = K / 2;
  TM_UNROLL
  for (int kx = 0; kx < K; ++kx) {
    TM_UNROLL
    for (int v = 0; v < V; ++v) part[kx][v] = A(0);
  }
  uint32_t lo, hi;
  dw_chunk_rows32(static_cast<uint32_t>(B * g.H), static_cast<uint32_t>(chunks),
                  static_cast<uint32_t>(it.chunk), &lo, &hi);
  if (lo >= hi) return;
  const int64_t H = g.H;
  int64_t y = lo % static_cast<uint32_t>(H);
  const int ky = static_cast<int>(it.ky);
  for (int64_t row = lo; row < static_cast<int64_t>(hi); ++row) {
    const int64_t sy = y + ky - pad;
    if (sy >= 0 && sy < H) {
      const int64_t src_row = row - y + sy;
      for (int64_t x0 = 0; x0 < g.W; x0 += R) {
        using P = decltype(fetch_dy(row, x0));
        P draw[R];
        TM_UNROLL
        for (int r = 0; r < R; ++r) draw[r] = x0 + r < g.W ? fetch_dy(row, x0 + r) : P{};
        A in_row[R + K - 1][V];
        load_vec_row<K, R, V>(g, src_row, x0, fetch_in, cvt, in_row);
        A d[R][V];
        TM_UNROLL
        for (int r = 0; r < R; ++r) cvt(draw[r], d[r]);
        TM_UNROLL
        for (int kx = 0; kx < K; ++kx) {
          TM_UNROLL
          for (int r = 0; r < R; ++r) {
            // Past the map's edge d is a zero pad, but the input beside it may be a real
            // non-finite value: skip the term rather than add 0 * inf.
            if (x0 + r >= g.W) break;
            TM_UNROLL
            for (int v = 0; v < V; ++v) part[kx][v] += d[r][v] * in_row[r + kx][v];
          }
        }
      }
    }
    if (++y == H) y = 0;
  }
}

}  // namespace gnconv
}  // namespace tokenmix
