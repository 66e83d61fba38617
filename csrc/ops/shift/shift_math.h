// Index math of the shifted / rearranged token-mixing family, shared by the CPU and CUDA kernels so
// that the CPU tests exercise what the GPU runs. No torch headers.
//
// Every op of the family reads a "grid" tensor [B, K, GH, GW] through a TokenMap from a "source"
// map [B, C, H, W]:
//   Shift  K = C, GH = H, GW = W: grid channel c reads source (h - dy_c, w - dx_c) (zeros mode:
//          0 outside the map; circular: wrapped).
//   Fold   along axis 2 (rows) or 3 (columns) with region p and cyclic shift s: grid channel
//          c * p + k at folded position g reads padded position t = g * p + k of the rolled axis,
//          i.e. source position (t - s) mod L; positions t >= L are the circular padding (wrap)
//          or zero (the adjoint of the unfold's crop).
// The fused projections read their GEMM operand through the map, so the shifted or folded tensor
// never exists; the unfold writes through the inverse of the fold map.
#pragma once

#include <cstdint>

#include "tokenmix/macros.h"

namespace tokenmix {
namespace shift {

enum class MapKind : int32_t { Identity, Shift, Fold };

// Element strides of a [B, C, H, W] tensor (NCHW, channels_last or any view).
struct Strides4 {
  int64_t b, c, h, w;
};

struct TokenMap {
  MapKind kind;
  int64_t C, H, W;  // the source map
  // Shift: per-channel (dy, dx), int64 [C, 2], normalised by normalise_shift (device memory on
  // CUDA): a normalised shift can be as large as its axis, which may exceed 2^31 - 1.
  // circular: wrap around instead of reading zeros.
  const int64_t* dyx;
  bool circular;
  // Fold: axis 2 or 3; region p; shift s in [0, L); L the axis length; Lp = ceil(L / p) * p.
  // wrap: padded positions read their circular source (region_fold) or zero (the adjoint of the
  // unfold's crop, region_unfold_backward).
  int32_t axis;
  int64_t p, s, L, Lp;
  bool wrap;

  // Grid sizes [K, GH, GW].
  TM_HOST_DEVICE int64_t K() const { return kind == MapKind::Fold ? C * p : C; }
  TM_HOST_DEVICE int64_t GH() const { return kind == MapKind::Fold && axis == 2 ? Lp / p : H; }
  TM_HOST_DEVICE int64_t GW() const { return kind == MapKind::Fold && axis == 3 ? Lp / p : W; }
};

// A shift along an axis of length n as the kernels want it: circular shifts reduced to [0, n),
// zero-mode shifts clamped to [-n, n] (anything further reads only zeros, as n does).
TM_HOST_DEVICE int64_t normalise_shift(int64_t d, int64_t n, bool circular) {
  if (circular) {
    const int64_t r = d % n;
    return r < 0 ? r + n : r;
  }
  return d < -n ? -n : (d > n ? n : d);
}

// Source position along a shifted axis of length n for output position i, or -1 (zeros mode,
// outside the map). d is normalised (normalise_shift).
TM_HOST_DEVICE int64_t shifted_source(int64_t i, int64_t d, int64_t n, bool circular) {
  int64_t j = i - d;
  if (circular) {
    return j < 0 ? j + n : j;
  }
  return (j >= 0 && j < n) ? j : -1;
}

// Source position along the folded axis of padded position t in [0, Lp), or -1 (t >= L in a map
// without wrap). s in [0, L) and Lp < 2 L, so (t - s) mod L is one conditional add or subtract.
TM_HOST_DEVICE int64_t fold_source(const TokenMap& m, int64_t t) {
  if (t >= m.L && !m.wrap) {
    return -1;
  }
  int64_t i = t - m.s;
  if (i < 0) {
    i += m.L;
  } else if (i >= m.L) {
    i -= m.L;
  }
  return i;
}

// The first padded position that reads source position i along the folded axis: (i + s) mod L.
// With wrap, t + L is a second one when t + L < Lp (the circular padding).
TM_HOST_DEVICE int64_t fold_target(const TokenMap& m, int64_t i) {
  const int64_t t = i + m.s;
  return t >= m.L ? t - m.L : t;
}

// Offset in the source of grid element (b, k, gy, gx), or -1 where the map reads zero.
TM_HOST_DEVICE int64_t source_offset(const TokenMap& m, const Strides4& st, int64_t b, int64_t k,
                                     int64_t gy, int64_t gx) {
  const int64_t base = b * st.b;
  switch (m.kind) {
    case MapKind::Shift: {
      const int64_t h = shifted_source(gy, m.dyx[2 * k], m.H, m.circular);
      const int64_t w = shifted_source(gx, m.dyx[2 * k + 1], m.W, m.circular);
      return (h < 0 || w < 0) ? -1 : base + k * st.c + h * st.h + w * st.w;
    }
    case MapKind::Fold: {
      const int64_t c = k / m.p, kk = k - c * m.p;
      if (m.axis == 2) {
        const int64_t h = fold_source(m, gy * m.p + kk);
        return h < 0 ? -1 : base + c * st.c + h * st.h + gx * st.w;
      }
      const int64_t w = fold_source(m, gx * m.p + kk);
      return w < 0 ? -1 : base + c * st.c + gy * st.h + w * st.w;
    }
    default:
      return base + k * st.c + gy * st.h + gx * st.w;
  }
}

// Grid element (channel, gy, gx) holding padded position t of source channel c, the other
// coordinate `o` (a column for axis 2, a row for axis 3) unchanged.
struct GridPos {
  int64_t k, gy, gx;
};
TM_HOST_DEVICE GridPos fold_grid_pos(const TokenMap& m, int64_t c, int64_t t, int64_t o) {
  const int64_t g = t / m.p;
  const int64_t k = c * m.p + (t - g * m.p);
  return m.axis == 2 ? GridPos{k, g, o} : GridPos{k, o, g};
}

// ---- source_offset split for the kernels' hot loops ---------------------------------------------
// source_offset(m, st, b, k, gy, gx) == map_offset(m, st, map_channel<I>(m, st, k),
// b * st.b, gy, gx): the part fixed by the grid channel (a division by p for Fold) is computed once
// per tile row and the rest is adds and compares. I is the index type of the divisions: uint32_t
// where the caller proved the divided values below 2^31, int64_t otherwise.
struct MapChannel {
  int64_t coff;  // k (Fold: c = k / p) times the channel stride
  int64_t a, b;  // Shift: (dy, dx); Fold: (kk = k - c p, unused); Identity: unused
};

template <typename I>
TM_HOST_DEVICE MapChannel map_channel(const TokenMap& m, const Strides4& st, I k) {
  switch (m.kind) {
    case MapKind::Shift:
      return {static_cast<int64_t>(k) * st.c, m.dyx[2 * static_cast<int64_t>(k)],
              m.dyx[2 * static_cast<int64_t>(k) + 1]};
    case MapKind::Fold: {
      const I p = static_cast<I>(m.p);
      const I c = k / p;
      return {static_cast<int64_t>(c) * st.c, static_cast<int64_t>(k - c * p), 0};
    }
    default:
      return {static_cast<int64_t>(k) * st.c, 0, 0};
  }
}

// base = b * st.b; -1 where the map reads zero (as source_offset).
TM_HOST_DEVICE int64_t map_offset(const TokenMap& m, const Strides4& st, const MapChannel& ch,
                                  int64_t base, int64_t gy, int64_t gx) {
  switch (m.kind) {
    case MapKind::Shift: {
      const int64_t h = shifted_source(gy, ch.a, m.H, m.circular);
      const int64_t w = shifted_source(gx, ch.b, m.W, m.circular);
      return (h < 0 || w < 0) ? -1 : base + ch.coff + h * st.h + w * st.w;
    }
    case MapKind::Fold: {
      if (m.axis == 2) {
        const int64_t h = fold_source(m, gy * m.p + ch.a);
        return h < 0 ? -1 : base + ch.coff + h * st.h + gx * st.w;
      }
      const int64_t w = fold_source(m, gx * m.p + ch.a);
      return w < 0 ? -1 : base + ch.coff + gy * st.h + w * st.w;
    }
    default:
      return base + ch.coff + gy * st.h + gx * st.w;
  }
}

// A grid channel k as digits (c, kk) = (k / p, k - c p) of the map's region p (1 for maps other
// than Fold: c = k), so that a kernel walking k by a fixed step divides once and then adds:
// advance_channel(d, split_channel(step, p), p) turns the digits of k into those of k + step.
template <typename I>
struct ChannelDigits {
  I c, kk;
};

template <typename I>
TM_HOST_DEVICE I map_region(const TokenMap& m) {
  return m.kind == MapKind::Fold ? static_cast<I>(m.p) : I(1);
}

template <typename I>
TM_HOST_DEVICE ChannelDigits<I> split_channel(I k, I p) {
  const I c = k / p;
  return {c, k - c * p};
}

template <typename I>
TM_HOST_DEVICE void advance_channel(ChannelDigits<I>& d, const ChannelDigits<I>& step, I p) {
  d.kk += step.kk;
  const I cy = d.kk >= p ? I(1) : I(0);
  d.kk -= cy * p;
  d.c += step.c + cy;
}

// map_channel from the digits of k (p = map_region(m)).
template <typename I>
TM_HOST_DEVICE MapChannel map_channel_of(const TokenMap& m, const Strides4& st,
                                         const ChannelDigits<I>& d) {
  const int64_t c = static_cast<int64_t>(d.c);
  switch (m.kind) {
    case MapKind::Shift:
      return {c * st.c, m.dyx[2 * c], m.dyx[2 * c + 1]};
    case MapKind::Fold:
      return {c * st.c, static_cast<int64_t>(d.kk), 0};
    default:
      return {c * st.c, 0, 0};
  }
}

// Pixel n of a [B, GH, GW] grid (gx fastest), split with index type I.
template <typename I>
struct PixelOf {
  I b, gy, gx;
};

template <typename I>
TM_HOST_DEVICE PixelOf<I> split_pixel(I n, I GH, I GW) {
  const I hw = GH * GW;
  const I b = n / hw;
  const I r = n - b * hw;
  const I gy = r / GW;
  return {b, gy, r - gy * GW};
}

// q = the pixel of n + delta given q the pixel of n and d = split_pixel(delta): a mixed-radix add
// (each digit sum is below twice its radix, so one conditional subtract per digit); b may pass B.
template <typename I>
TM_HOST_DEVICE void advance_pixel(PixelOf<I>& q, const PixelOf<I>& d, I GH, I GW) {
  q.gx += d.gx;
  const I cx = q.gx >= GW ? I(1) : I(0);
  q.gx -= cx * GW;
  q.gy += d.gy + cx;
  const I cy = q.gy >= GH ? I(1) : I(0);
  q.gy -= cy * GH;
  q.b += d.b + cy;
}

// Flat index t of a walk over 4 digits, d[0] fastest with radices r0, r1, r2 (d[3] unbounded).
// Grid-stride loops split their first index and the stride once and then advance by a mixed-radix
// add (advance_digits), which needs no division.
template <typename I>
struct Digits4 {
  I d[4];
};

template <typename I>
TM_HOST_DEVICE Digits4<I> split_digits(I t, I r0, I r1, I r2) {
  Digits4<I> q;
  I u = t / r0;
  q.d[0] = t - u * r0;
  t = u;
  u = t / r1;
  q.d[1] = t - u * r1;
  t = u;
  u = t / r2;
  q.d[2] = t - u * r2;
  q.d[3] = u;
  return q;
}

template <typename I>
TM_HOST_DEVICE void advance_digits(Digits4<I>& q, const Digits4<I>& s, I r0, I r1, I r2) {
  q.d[0] += s.d[0];
  I cy = q.d[0] >= r0 ? I(1) : I(0);
  q.d[0] -= cy * r0;
  q.d[1] += s.d[1] + cy;
  cy = q.d[1] >= r1 ? I(1) : I(0);
  q.d[1] -= cy * r1;
  q.d[2] += s.d[2] + cy;
  cy = q.d[2] >= r2 ? I(1) : I(0);
  q.d[2] -= cy * r2;
  q.d[3] += s.d[3] + cy;
}

// fold_grid_pos with index type I for the division by p (t and c * p + p below 2^31 when
// I is uint32_t).
template <typename I>
TM_HOST_DEVICE GridPos fold_grid_pos_i(const TokenMap& m, I c, I t, int64_t o) {
  const I p = static_cast<I>(m.p);
  const I g = t / p;
  const int64_t k = static_cast<int64_t>(c * p + (t - g * p));
  const int64_t g64 = static_cast<int64_t>(g);
  return m.axis == 2 ? GridPos{k, g64, o} : GridPos{k, o, g64};
}

// ---- 16-byte items of the data-movement kernels ------------------------------------------------
// A gather item of v elements along the output's fastest dimension (channels when cf, columns
// otherwise) may be one vector where both tensors have stride 1 along it, every other stride a
// multiple of v, that dimension a multiple of v, and the map does not scatter it (Fold mixes
// channels with rows; an axis-3 Fold strides columns by p). Pointer alignment is the caller's.
TM_HOST_DEVICE bool gather_vector_ok(const TokenMap& m, const Strides4& ss, const Strides4& os,
                                     bool cf, int64_t v) {
  if (cf) {
    return m.kind != MapKind::Fold && ss.c == 1 && os.c == 1 && m.K() % v == 0 &&
           ss.b % v == 0 && ss.h % v == 0 && ss.w % v == 0 && os.b % v == 0 && os.h % v == 0 &&
           os.w % v == 0;
  }
  return !(m.kind == MapKind::Fold && m.axis == 3) && ss.w == 1 && os.w == 1 && m.GW() % v == 0 &&
         ss.b % v == 0 && ss.h % v == 0 && ss.c % v == 0 && os.b % v == 0 && os.h % v == 0 &&
         os.c % v == 0;
}

// Whether the v-wide gather item at grid channel k (ch = its map_channel) reads one contiguous
// run of the source (else it is copied element by element): Identity; columns fastest, an axis-2
// Fold (rows move whole) or a Shift by a multiple of v (its zero-mode bounds and circular wrap
// are multiples of v too, so the run is all inside or all outside); channels fastest, a Shift
// whose v channels share one (dy, dx).
TM_HOST_DEVICE bool gather_item_is_run(const TokenMap& m, const MapChannel& ch, int64_t k, bool cf,
                                       int64_t v) {
  if (m.kind == MapKind::Identity) return true;
  if (m.kind != MapKind::Shift) return !cf && m.kind == MapKind::Fold && m.axis == 2;
  if (!cf) return ch.b % v == 0;
  bool same = true;
  for (int64_t e = 1; e < v; ++e) {
    same = same && m.dyx[2 * (k + e)] == ch.a && m.dyx[2 * (k + e) + 1] == ch.b;
  }
  return same;
}

// An unfold item of v output columns may be one vector (per padded copy) for an axis-2 Fold with
// columns fastest under the same stride conditions: the fold keeps columns.
TM_HOST_DEVICE bool unfold_vector_ok(const TokenMap& m, const Strides4& gs, const Strides4& os,
                                     bool cf, int64_t v) {
  return !cf && m.axis == 2 && gs.w == 1 && os.w == 1 && m.W % v == 0 && gs.b % v == 0 &&
         gs.h % v == 0 && gs.c % v == 0 && os.b % v == 0 && os.h % v == 0 && os.c % v == 0;
}

}  // namespace shift
}  // namespace tokenmix
