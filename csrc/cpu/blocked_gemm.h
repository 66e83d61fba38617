// Register-blocked GEMMs for the CPU kernels, for the narrow shapes where the BLAS spends more on
// packing and on an extra pass over its output than on the product:
//   gated_gemm    dst = (A W^T + bias) * g, over rows of A, with W packed once per call into
//                 panels (pack_panels) and the bias and gate applied as the sums leave the
//                 registers (the pre-gate value kept too, when asked);
//   weight_grad   out = A^T B summed over rows in order: a reduction whose result depends on
//                 neither the thread nor the thread count;
//   small_gemm    C = init + A B for operands that already sit in cache (a window's attention
//                 products, a packed tile of the shift family's projections): A read in place as
//                 rows or as columns, so A^T needs no transpose.
// The GEMMs sum every output in k order whatever the blocking, so a row's bits do not depend on the
// tile it is in. Per capability (cpu/per_isa.h): the register blocks are sized for the build's
// ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/per_isa.h"
#include "cpu/rows.h"

namespace tokenmix {
namespace cpu {
inline namespace CPU_CAPABILITY {

// out[r, c] = sum over rows (pixels) p < np, in order, of a[p, r] * b[p, c] for r < R, c < N: a
// weight gradient over one tile. Element (p, r) of a at a + p * a_p + r * a_r, row p of b at
// b + p * ldb, element (r, c) of out at out + r * o_r + c * o_c. Not the BLAS: MKL's result for a
// reduction this long can change with the thread that calls it, and the gradients must not
// depend on the thread count. 4 rows x 4 vectors of sums stay in registers.
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

// ---- gated GEMM --------------------------------------------------------------------------------
//
// Each thread packs W once per call into panels of kGemmCols vectors of output channels,
// [panel][k][kGemmCols * V] (zero past N); kGemmRows rows x kGemmCols vectors of sums stay in
// registers, summed in k order; the bias and the gate are applied as the sums leave them.

// Register budgets, within the ISA's vector registers (AVX-512: 32; the others: 16):
// - gated GEMM: kGemmRows rows x kGemmCols vectors of sums, plus kGemmCols vectors of the weight
//   panel and one broadcast (AVX-512: 6 x 4 + 5; the others: 4 x 2 + 3);
// - small GEMM (below): up to kSmallSums sums in at most kSmallCols vectors per row, plus those
//   vectors of B and one broadcast (AVX-512: 24 + 4 + 1; the others: 12 + 3 + 1).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kGemmRows = 6;
constexpr int64_t kGemmCols = 4;
constexpr int kSmallSums = 24;
constexpr int kSmallCols = 4;
#else
constexpr int64_t kGemmRows = 4;
constexpr int64_t kGemmCols = 2;
constexpr int kSmallSums = 12;
constexpr int kSmallCols = 3;
#endif

// acc[i][j] += sum over k < K, in order, of A(i, k) * b[k * ldb + j V, + V): the k loop of a
// register block, R rows x NB vectors of sums. A(i, k) is a[i * lda + k], or a[k * lda + i] when
// kTransA; each element is a broadcast, so reading A by columns costs the same as by rows.
template <typename A, bool kTransA, int64_t R, int64_t NB>
inline void accumulate_block(int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, Vec<A> (&acc)[R][NB]) {
  constexpr int64_t V = Vec<A>::size();
  for (int64_t k = 0; k < K; ++k) {
    Vec<A> bv[NB];
#pragma GCC unroll 4
    for (int64_t j = 0; j < NB; ++j) bv[j] = Vec<A>::loadu(b + k * ldb + j * V);
#pragma GCC unroll 12
    for (int64_t i = 0; i < R; ++i) {
      const Vec<A> av(kTransA ? a[k * lda + i] : a[i * lda + k]);
#pragma GCC unroll 4
      for (int64_t j = 0; j < NB; ++j) acc[i][j] = at::vec::fmadd(av, bv[j], acc[i][j]);
    }
  }
}

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
// the pre-gate value z[m, :N] = sums + bias (for a backward that needs it).
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
  accumulate_block<A, false, Rows, kGemmCols>(K, a, lda, panel, NR, acc);
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

// ---- small GEMM --------------------------------------------------------------------------------
//
// C[M, N] = init0 + init1 + A B, where every operand is small and in cache, so nothing is packed.
// A is read in place by rows or by columns (accumulate_block). B is [K, N] row-major
// and N a multiple of the vector width (callers pad their buffers). The inits (each may be null)
// seed the sums: rows of an additive bias or a 0 / -inf mask, or one value per row of C (a bias
// per output channel when C's columns are pixels). Sums run in k order.
//
// Register block: R rows x NB vectors of sums with R * NB <= kSmallSums, NB <= kSmallCols (see
// the register budgets above).

// Row i of the init: p[i * ld, + N), or, when per_row, p[i * ld] in every column.
template <typename A>
struct InitRows {
  const A* p = nullptr;
  int64_t ld = 0;
  bool per_row = false;
};

template <typename A, bool kTransA, int64_t R, int64_t NB>
inline void small_block(int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
                        InitRows<A> i0, InitRows<A> i1) {
  constexpr int64_t V = Vec<A>::size();
  Vec<A> acc[R][NB];
  // One loop per kind of init, chosen outside it: tests inside would let -O3 unswitch the loops
  // into a copy per combination, which multiplies the compile time of every instantiation.
  const auto fill = [&](auto value) {
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = value(i, j);
    }
  };
  if (i0.p == nullptr) {
    fill([](int, int) { return Vec<A>(A(0)); });
  } else if (i0.per_row) {
    fill([&](int i, int) { return Vec<A>(i0.p[i * i0.ld]); });
  } else {
    fill([&](int i, int j) { return Vec<A>::loadu(i0.p + i * i0.ld + j * V); });
  }
  if (i1.p != nullptr) {
    if (i1.per_row) {
      fill([&](int i, int j) { return acc[i][j] + Vec<A>(i1.p[i * i1.ld]); });
    } else {
      fill([&](int i, int j) { return acc[i][j] + Vec<A>::loadu(i1.p + i * i1.ld + j * V); });
    }
  }
  accumulate_block<A, kTransA, R, NB>(K, a, lda, b, ldb, acc);
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j].store(c + i * ldc + j * V);
  }
}

// Rows [0, M) of one column chunk of NB vectors: blocks of kSmallRows(NB) rows, the last rows in a
// block of their own size (so that no row's sums depend on the block it falls in).
template <int NB>
constexpr int kSmallRows = kSmallSums / NB < 12 ? kSmallSums / NB : 12;

template <typename A, bool kTransA, int NB>
void small_chunk(int64_t M, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
                 InitRows<A> i0, InitRows<A> i1) {
  constexpr int R = kSmallRows<NB>;
  const auto step = [](InitRows<A> r, int64_t m) {
    return InitRows<A>{r.p != nullptr ? r.p + m * r.ld : nullptr, r.ld, r.per_row};
  };
  const auto row_of = [&](int64_t m) { return kTransA ? a + m : a + m * lda; };
  int64_t m = 0;
  for (; m + R <= M; m += R) {
    small_block<A, kTransA, R, NB>(K, row_of(m), lda, b, ldb, c + m * ldc, ldc, step(i0, m), step(i1, m));
  }
  switch (M - m) {
#define TM_SMALL_TAIL(r)                                                                              \
  case r:                                                                                           \
    if constexpr (r < R) {                                                                          \
      small_block<A, kTransA, r, NB>(K, row_of(m), lda, b, ldb, c + m * ldc, ldc, step(i0, m), step(i1, m)); \
    }                                                                                               \
    break;
    TM_SMALL_TAIL(1) TM_SMALL_TAIL(2) TM_SMALL_TAIL(3) TM_SMALL_TAIL(4) TM_SMALL_TAIL(5) TM_SMALL_TAIL(6)
    TM_SMALL_TAIL(7) TM_SMALL_TAIL(8) TM_SMALL_TAIL(9) TM_SMALL_TAIL(10) TM_SMALL_TAIL(11)
#undef TM_SMALL_TAIL
    default:
      break;
  }
}

template <typename A, bool kTransA>
void small_gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c,
                int64_t ldc, InitRows<A> i0 = {}, InitRows<A> i1 = {}) {
  constexpr int64_t V = Vec<A>::size();
  const auto shift = [](InitRows<A> r, int64_t n) {
    return InitRows<A>{r.p != nullptr && !r.per_row ? r.p + n : r.p, r.ld, r.per_row};
  };
  for (int64_t n0 = 0; n0 < N; n0 += kSmallCols * V) {
    const int nb = static_cast<int>(std::min<int64_t>(kSmallCols, (N - n0) / V));
    const A* bn = b + n0;
    A* cn = c + n0;
    if (nb == 4) {
      small_chunk<A, kTransA, kSmallCols < 4 ? kSmallCols : 4>(M, K, a, lda, bn, ldb, cn, ldc, shift(i0, n0), shift(i1, n0));
    } else if (nb == 3) {
      small_chunk<A, kTransA, 3>(M, K, a, lda, bn, ldb, cn, ldc, shift(i0, n0), shift(i1, n0));
    } else if (nb == 2) {
      small_chunk<A, kTransA, 2>(M, K, a, lda, bn, ldb, cn, ldc, shift(i0, n0), shift(i1, n0));
    } else {
      small_chunk<A, kTransA, 1>(M, K, a, lda, bn, ldb, cn, ldc, shift(i0, n0), shift(i1, n0));
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace tokenmix
