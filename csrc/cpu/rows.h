// Vectorised row helpers for the CPU kernels: elementwise maps over rows, column sums, transposes,
// tiles of image pixels in NCHW or NHWC, partial-vector loads and stores, and raw memory viewed
// as a tensor, in the vectors of the build's ISA (at::vec). Per capability (cpu/per_isa.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/per_isa.h"

namespace tokenmix {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename A>
using Vec = at::vec::Vectorized<A>;

// Memory the kernel owns, as a tensor (no copy), e.g. for an out= GEMM into scratch memory.
template <typename A>
at::Tensor blob(A* p, at::IntArrayRef sizes) {
  return at::from_blob(p, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

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

// dst[:n] += src[:n].
template <typename A>
void add_into(A* dst, const A* src, int64_t n) {
  at::vec::map2<A>([](Vec<A> d, Vec<A> v) { return d + v; }, dst, dst, src, n);
}

// sum[:n] = column sums of src[rows, :n], rows in order.
template <typename A>
void column_sums(int64_t rows, int64_t n, const A* src, int64_t ld, A* sum) {
  std::fill(sum, sum + n, A(0));
  for (int64_t r = 0; r < rows; ++r) add_into(sum, src + r * ld, n);
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

// exp(x) for softmax arguments (x <= 0, -inf or NaN). On AVX-512 for float: x = n ln2 + r with
// n = round(x log2(e)) and r reduced in two steps (ln2 split into a short high part, exact in the
// product with n, and a low part), so r is accurate whatever the size of x; e^r is a degree-6
// polynomial fitted for relative error (1e-7 on |r| <= ln2 / 2) and 2^n is applied by vscalefps.
// Results below 2^-125 are flushed to zero: a denormal would cost a microcode assist in every
// product that reads it (NaN still gives NaN). Twelve vector instructions against twenty of
// exp_u20, which the other builds and types use.
template <typename A>
inline Vec<A> exp_nonpositive(const Vec<A>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.3830375e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3747804e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1668341e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666421e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.9999991e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
#endif
  return x.exp_u20();
}

// The first n (<= Vec<A>::size()) lanes from / to p; a full vector without the mask.
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace tokenmix
