// Grid rows of the shifted / rearranged token-mixing family's CPU kernels (shift_cpu.cpp): how a
// row (b, k, gy) of the grid [B, K, GH, GW] of a map (shift_math.h) is read from, or written
// back to, its source tensor.
//
// A row with contiguous source columns follows a RowRule, the part fixed by its channel resolved
// once per run of rows: the same columns, the columns shifted by dx (zeros or wrapped), or a
// column table (a fold along the columns). An identity map of an NCHW plane moves each image's run
// of rows as one span. Sources whose columns are not contiguous (channels_last, strided views)
// go element by element through map_offset, the function the CUDA kernels use. A fold along the
// columns also moves by whole source rows (rolled_row, unrolled_row). Per capability
// (cpu/per_isa.h): include only from shift_cpu.cpp.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/per_isa.h"
#include "cpu/rows.h"
#include "shift_args.h"
#include "shift_math.h"

namespace tokenmix {
namespace shift {
inline namespace CPU_CAPABILITY {

using cpu::Vec;

// How one grid row reads its source row, for sources with contiguous columns.
struct RowRule {
  enum Kind { Zero, Same, Shift, Table } kind;
  int64_t base;          // offset of the source row's column 0
  int64_t dx;            // Shift: normalised column shift
  bool circular;         // Shift
  const int64_t* table;  // Table: grid column -> source column, or -1
};

// Column tables of a fold along axis 3: table[kk * GW + gx] = source column of padded position
// gx * p + kk, or -1.
inline std::vector<int64_t> fold_column_table(const TokenMap& m) {
  std::vector<int64_t> t;
  if (m.kind == MapKind::Fold && m.axis == 3) {
    const int64_t GW = m.GW();
    t.resize(m.p * GW);
    for (int64_t kk = 0; kk < m.p; ++kk) {
      for (int64_t gx = 0; gx < GW; ++gx) t[kk * GW + gx] = fold_source(m, gx * m.p + kk);
    }
  }
  return t;
}

// The rule of grid row (b, k, gy), the part fixed by k (ch = map_channel(m, st, k)) computed by the
// caller once per run of rows.
inline RowRule row_rule(const TokenMap& m, const Strides4& st, const std::vector<int64_t>& cols,
                 const MapChannel& ch, int64_t b, int64_t gy) {
  const int64_t base = b * st.b + ch.coff;
  switch (m.kind) {
    case MapKind::Shift: {
      const int64_t h = shifted_source(gy, ch.a, m.H, m.circular);
      if (h < 0) return {RowRule::Zero, 0, 0, false, nullptr};
      return {RowRule::Shift, base + h * st.h, ch.b, m.circular, nullptr};
    }
    case MapKind::Fold: {
      if (m.axis == 3) return {RowRule::Table, base + gy * st.h, 0, false, cols.data() + ch.a * m.GW()};
      const int64_t h = fold_source(m, gy * m.p + ch.a);
      if (h < 0) return {RowRule::Zero, 0, 0, false, nullptr};
      return {RowRule::Same, base + h * st.h, 0, false, nullptr};
    }
    default:
      return {RowRule::Same, base + gy * st.h, 0, false, nullptr};
  }
}

template <typename D, typename S>
void convert(D* dst, const S* src, int64_t n) {
  if constexpr (std::is_same_v<D, S>) {
    // Grid rows are often a few dozen elements, where vector copies beat a call to memcpy.
    constexpr int64_t V = Vec<D>::size();
    int64_t i = 0;
    for (; i + V <= n; i += V) Vec<D>::loadu(src + i).store(dst + i);
    if (i < n) Vec<D>::loadu(src + i, static_cast<int>(n - i)).store(dst + i, static_cast<int>(n - i));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(src[i]);
  }
}

// dst[gx] = source element of grid column gx (0 where the map reads zero), gx < n.
template <typename S, typename D>
void load_row(const RowRule& r, const S* src, int64_t n, D* dst) {
  const S* row = src + r.base;
  switch (r.kind) {
    case RowRule::Zero:
      std::fill(dst, dst + n, D(0));
      return;
    case RowRule::Same:
      convert(dst, row, n);
      return;
    case RowRule::Shift:
      if (r.circular) {  // dx in [0, n): columns [0, dx) wrap to the row's end
        convert(dst, row + n - r.dx, r.dx);
        convert(dst + r.dx, row, n - r.dx);
      } else {  // dx in [-n, n]: columns whose source lies outside read zero
        const int64_t lo = std::max<int64_t>(0, r.dx), hi = std::min<int64_t>(n, n + r.dx);
        std::fill(dst, dst + lo, D(0));
        convert(dst + lo, row + lo - r.dx, hi - lo);
        std::fill(dst + std::max(lo, hi), dst + n, D(0));
      }
      return;
    case RowRule::Table:
      for (int64_t gx = 0; gx < n; ++gx) {
        dst[gx] = r.table[gx] < 0 ? D(0) : static_cast<D>(row[r.table[gx]]);
      }
      return;
  }
}

// The inverse: source element of grid column gx = src[gx], for the columns the map reads.
template <typename S, typename D>
void store_row(const RowRule& r, const S* src, int64_t n, D* dst) {
  D* row = dst + r.base;
  switch (r.kind) {
    case RowRule::Zero:
      return;
    case RowRule::Same:
      convert(row, src, n);
      return;
    case RowRule::Shift:
      if (r.circular) {
        convert(row + n - r.dx, src, r.dx);
        convert(row, src + r.dx, n - r.dx);
      } else {
        const int64_t lo = std::max<int64_t>(0, r.dx), hi = std::min<int64_t>(n, n + r.dx);
        if (hi > lo) convert(row + lo - r.dx, src + lo, hi - lo);
      }
      return;
    case RowRule::Table:
      for (int64_t gx = 0; gx < n; ++gx) {
        if (r.table[gx] >= 0) row[r.table[gx]] = static_cast<D>(src[gx]);
      }
      return;
  }
}

// A grid row through the map, element by element (sources with non-contiguous columns).
template <typename S, typename D>
void load_row_strided(const TokenMap& m, const Strides4& st, const MapChannel& ch, const S* src, int64_t b,
                      int64_t gy, int64_t n, D* dst) {
  for (int64_t gx = 0; gx < n; ++gx) {
    const int64_t o = map_offset(m, st, ch, b * st.b, gy, gx);
    dst[gx] = o < 0 ? D(0) : static_cast<D>(src[o]);
  }
}

template <typename S, typename D>
void store_row_strided(const TokenMap& m, const Strides4& st, const MapChannel& ch, const S* src, int64_t b,
                       int64_t gy, int64_t n, D* dst) {
  for (int64_t gx = 0; gx < n; ++gx) {
    const int64_t o = map_offset(m, st, ch, b * st.b, gy, gx);
    if (o >= 0) dst[o] = static_cast<D>(src[gx]);
  }
}

// Reads and writes grid rows of one source tensor through one map.
template <typename S>
struct MappedRows {
  const TokenMap& m;
  Strides4 st;
  std::vector<int64_t> cols;
  int64_t n, GH;  // the grid's row length and rows per image

  MappedRows(const TokenMap& map, const at::Tensor& t)
      : m(map), st(strides_of(t)), cols(fold_column_table(map)), n(map.GW()), GH(map.GH()) {}

  // Grid rows (b, k, gy), (b, k, gy + 1), ... (on into the next image past the last row), `count`
  // of them, row i at dst + i * ldd: one run of a channel, its part of the map resolved once.
  template <typename D>
  void load_rows(const S* src, int64_t k, int64_t b, int64_t gy, int64_t count, D* dst, int64_t ldd) const {
    const auto span = [&](int64_t i, int64_t off, int64_t len) { convert(dst + i * n, src + off, len); };
    walk(k, b, gy, count, ldd, span, [&](int64_t i, const MapChannel& ch, int64_t rb, int64_t ry) {
      if (st.w == 1) {
        load_row(row_rule(m, st, cols, ch, rb, ry), src, n, dst + i * ldd);
      } else {
        load_row_strided(m, st, ch, src, rb, ry, n, dst + i * ldd);
      }
    });
  }
  // The inverse: row i of src (rows lds apart) to grid row i of the run.
  template <typename A>
  void store_rows(const A* src, int64_t lds, int64_t k, int64_t b, int64_t gy, int64_t count, S* dst) const {
    const auto span = [&](int64_t i, int64_t off, int64_t len) { convert(dst + off, src + i * n, len); };
    walk(k, b, gy, count, lds, span, [&](int64_t i, const MapChannel& ch, int64_t rb, int64_t ry) {
      if (st.w == 1) {
        store_row(row_rule(m, st, cols, ch, rb, ry), src + i * lds, n, dst);
      } else {
        store_row_strided(m, st, ch, src + i * lds, rb, ry, n, dst);
      }
    });
  }
  // A run of `count` grid rows of channel k from (b, gy), its rows ld apart on the packed side:
  // span(i, offset, elements) for each image's part where an identity map of an NCHW plane makes
  // it one contiguous span on both sides (i its first row in the run), else row(i, ch, b, gy) for
  // each row.
  template <typename Span, typename Row>
  void walk(int64_t k, int64_t b, int64_t gy, int64_t count, int64_t ld, Span span, Row row) const {
    if (m.kind == MapKind::Identity && st.w == 1 && st.h == n && ld == n) {
      for (int64_t i = 0; i < count;) {
        const int64_t rows = std::min(count - i, GH - gy);
        span(i, b * st.b + k * st.c + gy * st.h, rows * n);
        i += rows;
        gy = 0;
        ++b;
      }
      return;
    }
    const MapChannel ch = map_channel<int64_t>(m, st, k);
    for (int64_t i = 0; i < count; ++i) {
      row(i, ch, b, gy);
      if (++gy == GH) gy = 0, ++b;
    }
  }
};

// A fold along the columns of a source with contiguous columns, by whole source rows: row (c, h)
// is rolled and circularly padded into `padded` (Lp entries; zero past L without wrap), whose
// [Lp / p, p] entries are the columns of grid rows c * p + kk, kk < p. Replaces p table lookups
// per grid element with two copies and a small transpose.
template <typename S, typename A>
void rolled_row(const TokenMap& m, const S* row, A* padded) {
  const int64_t L = m.L, s = m.s;
  convert(padded + s, row, L - s);  // padded[t] = row[(t - s) mod L], t < L
  convert(padded, row + L - s, s);
  for (int64_t t = L; t < m.Lp; ++t) padded[t] = m.wrap ? padded[t - L] : A(0);
}

// An output row of an unfold along the columns, from grid rows whose columns are contiguous (a
// grid tensor's, or a projection tile's in the accumulation type): the p grid rows of channel c
// (g, kk lie kstride apart) interleave into the padded row, whose
// circular padding adds into the positions it copies (wrap), and the row is rolled back and
// cropped: out[i] = padded[(i + s) mod L]. Rolled_row's inverse, by whole rows where the element
// path divides per element.
template <typename G, typename A, typename S>
void unrolled_row(const TokenMap& m, const G* g, int64_t kstride, A* padded, S* out) {
  const int64_t p = m.p, L = m.L, s = m.s, GW = m.Lp / p;
  for (int64_t kk = 0; kk < p; ++kk) {
    const G* row = g + kk * kstride;
    for (int64_t x = 0; x < GW; ++x) padded[x * p + kk] = static_cast<A>(row[x]);
  }
  if (m.wrap) {
    for (int64_t t = L; t < m.Lp; ++t) padded[t - L] += padded[t];
  }
  convert(out, padded + s, L - s);
  convert(out + L - s, padded, s);
}

}  // namespace CPU_CAPABILITY
}  // namespace shift
}  // namespace tokenmix
