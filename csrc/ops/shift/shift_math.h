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

}  // namespace shift
}  // namespace tokenmix
