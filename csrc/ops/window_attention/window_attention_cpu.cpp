// CPU kernels of windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net local).
//
// Fuses roll + pad + window partition + scaled QK^T + relative position bias + region mask +
// softmax + PV + window reverse + crop + reverse roll: tokens are read from and written to their
// original map positions through window_attention_math.h. Per window, the operands of every head
// (Q pre-scaled, K, V) are gathered into small zero-padded buffers that stay in cache; per head,
// every product is a register-blocked small GEMM (cpu/blocked_gemm.h).
//
// Scores are kept transposed, S^T [key j, query i] with queries across the vector lanes: the
// softmax over keys is then a vertical max, exp and sum over rows, with no horizontal reduction,
// and the row statistics (max, log-sum-exp, 1 / sum) come out as vectors. The GEMMs read their A
// operand by rows or by columns in place, so P and dS are never transposed; only Q (and, for
// backward, dO) is, once per head. The bias and the region mask seed the score sums; a window's
// mask depends only on whether it is in the last row and/or column of windows, so the (at most
// four) masks are built once per call. No [T, T] matrix leaves the cache.
// Forward saves the row log-sum-exp; backward recomputes P from it.
//
// Backward is deterministic: dq/dk/dv rows belong to exactly one window; the bias-table gradient
// (a sum of dS over windows, scattered into the table at the end) and the global query's are
// accumulated in fixed chunks of windows, in window order, and the chunks' partials are summed in
// chunk order. Chunks are sized from the problem, never from the thread count.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/blocked_gemm.h"
#include "cpu/rows.h"
#include "window_attention_problem.h"

namespace tokenmix {
namespace window_attention {
namespace {

using cpu::InitRows;
using cpu::small_gemm;
using cpu::Vec;

int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// mx[0, n) = column maxima of x's rows [0, rows) (row stride n, n a multiple of the width).
template <typename A>
void column_max(const A* x, int64_t rows, int64_t n, A* mx) {
  constexpr int64_t W = Vec<A>::size();
  for (int64_t c = 0; c < n; c += W) {
    Vec<A> m(-std::numeric_limits<A>::infinity());
    for (int64_t r = 0; r < rows; ++r) m = at::vec::maximum(m, Vec<A>::loadu(x + r * n + c));
    m.store(mx + c);
  }
}

// x[r, c] = exp(x[r, c] - shift[c]) for rows [0, rows); sum[c] = the column sums (when sum is not
// null).
template <typename A>
void column_exp(A* x, int64_t rows, int64_t n, const A* shift, A* sum) {
  constexpr int64_t W = Vec<A>::size();
  for (int64_t c = 0; c < n; c += W) {
    const Vec<A> vs = Vec<A>::loadu(shift + c);
    Vec<A> acc(A(0));
    for (int64_t r = 0; r < rows; ++r) {
      const Vec<A> e = cpu::exp_nonpositive<A>(Vec<A>::loadu(x + r * n + c) - vs);
      e.store(x + r * n + c);
      acc = acc + e;
    }
    if (sum != nullptr) acc.store(sum + c);
  }
}

// dst[0, d) = mul * src[0, d), converting to the accumulation type.
template <typename scalar_t, typename A>
void load_row(const scalar_t* src, int64_t d, A mul, A* dst) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, A>) {
    constexpr int64_t W = Vec<A>::size();
    const Vec<A> vm(mul);
    for (; c + W <= d; c += W) (Vec<A>::loadu(src + c) * vm).store(dst + c);
  }
  for (; c < d; ++c) dst[c] = static_cast<A>(src[c]) * mul;
}

template <typename scalar_t, typename A>
void store_row(const A* src, int64_t d, A mul, scalar_t* dst) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, A>) {
    constexpr int64_t W = Vec<A>::size();
    const Vec<A> vm(mul);
    for (; c + W <= d; c += W) (Vec<A>::loadu(src + c) * vm).store(dst + c);
  }
  for (; c < d; ++c) dst[c] = static_cast<scalar_t>(src[c] * mul);
}

// Element offsets of a [B, H, W, heads, d] (or window-shaped) tensor with unit last stride.
struct Strides {
  int64_t b, y, x, h;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), y(t.stride(1)), x(t.stride(2)), h(t.stride(3)) {}
  int64_t at(int64_t bb, int64_t yy, int64_t xx, int64_t hh) const { return bb * b + yy * y + xx * x + hh * h; }
};

// Which of the four mask classes a window is in: whether it is in the last row and/or the last
// column of windows. Only those windows can hold tokens the shift brought from the opposite border
// (the map is a multiple of the window when shifted) or tokens past the map (a partial window).
int window_class(const Geometry& g, int64_t win) {
  const int64_t wr = win / g.nww, wc = win % g.nww;
  return (wr == g.nwh - 1 ? 2 : 0) + (wc == g.nww - 1 ? 1 : 0);
}

// Where the tokens of one window live: original coordinates and existence.
struct WindowTokens {
  std::vector<int64_t> y, x;
  std::vector<uint8_t> exists;
  int cls = 0;

  void build(const Geometry& g, int64_t win) {
    const int64_t T = g.tokens();
    y.resize(T);
    x.resize(T);
    exists.resize(T);
    for (int64_t t = 0; t < T; ++t) {
      int64_t sy, sx;
      exists[t] = shifted_coords(g, win, t, &sy, &sx);
      y[t] = exists[t] ? original_row(g, sy) : 0;
      x[t] = exists[t] ? original_col(g, sx) : 0;
    }
    cls = window_class(g, win);
  }
};

// Per-call constants: padded sizes, the relative index, each head's bias matrix and the region /
// existence masks of the window classes, both in the transposed score layout [key j, query i]:
// [T, Tpad], zero in the padding lanes i >= T.
template <typename A>
struct Setup {
  int64_t T, Tpad, d, dpad, heads;
  std::vector<int64_t> rel;  // [T * T]
  std::vector<A> bias;       // [heads, T, Tpad]
  // [T, Tpad] of 0 / -inf for a class with a query / key pair to exclude; empty otherwise. A
  // missing query's lane is left unmasked (finite scores; it is never stored).
  std::vector<A> mask[4];

  const A* bias_of(int64_t h) const { return bias.data() + h * T * Tpad; }
  const A* mask_of(int cls) const { return mask[cls].empty() ? nullptr : mask[cls].data(); }
};

template <typename scalar_t, typename A>
Setup<A> make_setup(const Problem& p) {
  const Geometry& g = p.geo;
  constexpr int64_t W = Vec<A>::size();
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  Setup<A> s;
  s.T = g.tokens();
  s.Tpad = round_up(s.T, W);
  s.heads = p.k.size(3);
  s.d = p.k.size(4);
  s.dpad = round_up(s.d, W);
  s.rel.resize(s.T * s.T);
  for (int64_t i = 0; i < s.T; ++i)
    for (int64_t j = 0; j < s.T; ++j) s.rel[i * s.T + j] = relative_index(g, i, j);
  s.bias.assign(s.heads * s.T * s.Tpad, A(0));
  const scalar_t* tb = nullptr;
  at::Tensor table;
  if (p.bias_table.defined()) {
    table = p.bias_table.contiguous();
    tb = table.const_data_ptr<scalar_t>();
  }
  if (tb != nullptr) {
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t j = 0; j < s.T; ++j)
        for (int64_t i = 0; i < s.T; ++i)
          s.bias[(h * s.T + j) * s.Tpad + i] = static_cast<A>(tb[s.rel[i * s.T + j] * s.heads + h]);
  }
  for (int cls = 0; cls < 4; ++cls) {
    const bool last_row = cls & 2, last_col = cls & 1;
    if ((!last_row && g.nwh == 1) || (!last_col && g.nww == 1)) continue;  // no such window
    const int64_t win = (last_row ? g.nwh - 1 : 0) * g.nww + (last_col ? g.nww - 1 : 0);
    std::vector<uint8_t> exists(s.T);
    std::vector<int> reg(s.T);
    bool masked = false;
    for (int64_t t = 0; t < s.T; ++t) {
      int64_t sy, sx;
      exists[t] = shifted_coords(g, win, t, &sy, &sx);
      reg[t] = exists[t] ? region(g, sy, sx) : -1;
      masked = masked || !exists[t] || reg[t] != reg[0];
    }
    if (!masked) continue;
    s.mask[cls].assign(s.T * s.Tpad, A(0));
    for (int64_t i = 0; i < s.T; ++i) {
      if (!exists[i]) continue;
      for (int64_t j = 0; j < s.T; ++j) {
        if (!exists[j] || reg[j] != reg[i]) s.mask[cls][j * s.Tpad + i] = kNegInf;
      }
    }
  }
  return s;
}

// A window's operands in task-local buffers, zero-padded, token-major: row t of Qs = scale * q,
// K and V holds every head's [dpad] slice of token t, so head h's [Tpad, dpad] operand starts at
// h * dpad with row stride ld = heads * dpad. One head's Qt = Qs^T [dpad, Tpad] is formed just
// before its products. When a token's heads are one contiguous span in memory (q, k, v views of
// a packed qkv row) and d needs no padding, a token's row is one vector copy. Missing tokens
// (partial windows) get zero rows; the paddings are zeroed once at allocation and never written.
template <typename scalar_t, typename A>
struct Operands {
  std::vector<A> Qs, K, V, Qt;
  int64_t ld = 0;

  const A* qs(int64_t h, int64_t dpad) const { return Qs.data() + h * dpad; }
  const A* k(int64_t h, int64_t dpad) const { return K.data() + h * dpad; }
  const A* v(int64_t h, int64_t dpad) const { return V.data() + h * dpad; }

  void allocate(const Setup<A>& s) {
    ld = s.heads * s.dpad;
    Qs.assign(s.Tpad * ld, A(0));
    K.assign(s.Tpad * ld, A(0));
    V.assign(s.Tpad * ld, A(0));
    Qt.assign(s.dpad * s.Tpad, A(0));
  }

  // Row t of dst from the token whose head 0 starts at src (head stride sh), times mul.
  static void load_token(const scalar_t* src, int64_t sh, const Setup<A>& s, A mul, A* dst) {
    if (sh == s.d && s.d == s.dpad) {
      load_row(src, s.heads * s.d, mul, dst);
    } else {
      for (int64_t h = 0; h < s.heads; ++h) load_row(src + h * sh, s.d, mul, dst + h * s.dpad);
    }
  }

  static void zero_token(const Setup<A>& s, A* dst) {
    for (int64_t h = 0; h < s.heads; ++h) std::fill(dst + h * s.dpad, dst + h * s.dpad + s.d, A(0));
  }

  void gather(const Problem& p, const Setup<A>& s, const WindowTokens& w, int64_t b) {
    const Strides sq(p.q), sk(p.k), sv(p.v);
    const scalar_t* q = p.q.const_data_ptr<scalar_t>();
    const scalar_t* k = p.k.const_data_ptr<scalar_t>();
    const scalar_t* v = p.v.const_data_ptr<scalar_t>();
    const A scale = static_cast<A>(p.scale);
    const int64_t ww = p.geo.ww;
    for (int64_t t = 0; t < s.T; ++t) {
      A* qs = Qs.data() + t * ld;
      A* kr = K.data() + t * ld;
      A* vr = V.data() + t * ld;
      if (p.global_q) {
        load_token(q + sq.at(b, t / ww, t % ww, 0), sq.h, s, scale, qs);
      } else if (w.exists[t]) {
        load_token(q + sq.at(b, w.y[t], w.x[t], 0), sq.h, s, scale, qs);
      } else {
        zero_token(s, qs);
      }
      if (w.exists[t]) {
        load_token(k + sk.at(b, w.y[t], w.x[t], 0), sk.h, s, A(1), kr);
        load_token(v + sv.at(b, w.y[t], w.x[t], 0), sv.h, s, A(1), vr);
      } else {
        zero_token(s, kr);
        zero_token(s, vr);
      }
    }
  }
};

// St = K Qs^T + bias (+ mask) for head h: [T, Tpad], keys by queries; -inf at masked pairs.
template <typename scalar_t, typename A>
void scores_t(const Setup<A>& s, Operands<scalar_t, A>& ops, const WindowTokens& w, int64_t h, A* St) {
  cpu::transpose<A>(ops.qs(h, s.dpad), ops.ld, s.Tpad, s.dpad, ops.Qt.data(), s.Tpad);
  small_gemm<A, false>(s.T, s.Tpad, s.d, ops.k(h, s.dpad), ops.ld, ops.Qt.data(), s.Tpad, St, s.Tpad,
                       InitRows<A>{s.bias_of(h), s.Tpad}, InitRows<A>{s.mask_of(w.cls), s.Tpad});
}

template <typename scalar_t>
void forward_typed(const Problem& p, at::Tensor& out, at::Tensor& lse_t) {
  using A = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<A>::size();
  const Geometry& g = p.geo;
  const Setup<A> s = make_setup<scalar_t, A>(p);
  const int64_t B = p.k.size(0), nW = g.windows();
  const Strides so(out);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  A* lse = lse_t.defined() ? lse_t.mutable_data_ptr<A>() : nullptr;
  at::parallel_for(0, B * nW, 1, [&](int64_t begin, int64_t end) {
    WindowTokens w;
    Operands<scalar_t, A> ops;
    ops.allocate(s);
    std::vector<A> St(s.T * s.Tpad), O(s.T * s.dpad), mx(s.Tpad), sum(s.Tpad), row_lse(s.Tpad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nW;
      w.build(g, task % nW);
      ops.gather(p, s, w, b);
      for (int64_t h = 0; h < s.heads; ++h) {
        scores_t(s, ops, w, h, St.data());
        column_max(St.data(), s.T, s.Tpad, mx.data());
        column_exp(St.data(), s.T, s.Tpad, mx.data(), sum.data());
        for (int64_t i = 0; i < s.Tpad; i += W) {
          const Vec<A> sv = Vec<A>::loadu(sum.data() + i);
          (Vec<A>::loadu(mx.data() + i) + sv.log()).store(row_lse.data() + i);
          sv.reciprocal().store(sum.data() + i);
        }
        if (lse != nullptr) {
          for (int64_t i = 0; i < s.T; ++i) lse[(task * s.T + i) * s.heads + h] = w.exists[i] ? row_lse[i] : A(0);
        }
        // O = P V with P = St^T, read by columns.
        small_gemm<A, true>(s.T, s.dpad, s.T, St.data(), s.Tpad, ops.v(h, s.dpad), ops.ld, O.data(), s.dpad);
        for (int64_t i = 0; i < s.T; ++i) {
          if (w.exists[i]) store_row(O.data() + i * s.dpad, s.d, sum[i], o + so.at(b, w.y[i], w.x[i], h));
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const Problem& p, const at::Tensor& grad, const at::Tensor& lse_t,
                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
  using A = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<A>::size();
  const Geometry& g = p.geo;
  const Setup<A> s = make_setup<scalar_t, A>(p);
  const int64_t B = p.k.size(0), nW = g.windows();
  // A unit is one window, or, for a global query, all windows of one image (its gradient is a
  // sum over them). Units are grouped into chunks of a size fixed by the problem: each chunk sums
  // its units' bias gradients in order into a partial of its own.
  const int64_t per_unit = p.global_q ? nW : 1;
  const int64_t units = B * nW / per_unit;
  const int64_t per_chunk = std::max<int64_t>(1, units / 64);
  const int64_t chunks = (units + per_chunk - 1) / per_chunk;
  const bool has_bias = p.bias_table.defined();
  const int64_t TT = s.T * s.Tpad;
  std::vector<A> dS_part(has_bias ? chunks * s.heads * TT : 0, A(0));
  const Strides sg(grad), sq(dq), sk(dk), sv(dv);
  const scalar_t* go = grad.const_data_ptr<scalar_t>();
  const A* lse = lse_t.const_data_ptr<A>();
  scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
  const A scale = static_cast<A>(p.scale);

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    WindowTokens w;
    Operands<scalar_t, A> ops;
    ops.allocate(s);
    std::vector<A> dO(s.Tpad * ops.ld, A(0)), dOt(s.dpad * s.Tpad, A(0)), Pt(TT), dSt(TT), G(s.T * s.dpad),
        row_lse(s.Tpad), D(s.Tpad), dq_global;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* part = has_bias ? dS_part.data() + chunk * s.heads * TT : nullptr;
      const int64_t last = std::min(units, (chunk + 1) * per_chunk);
      for (int64_t unit = chunk * per_chunk; unit < last; ++unit) {
        const int64_t b = unit * per_unit / nW;
        if (p.global_q) dq_global.assign(s.heads * s.T * s.dpad, A(0));
        for (int64_t win = unit * per_unit % nW, n = 0; n < per_unit; ++n, ++win) {
          w.build(g, win);
          ops.gather(p, s, w, b);
          for (int64_t i = 0; i < s.T; ++i) {
            A* row = dO.data() + i * ops.ld;
            if (w.exists[i]) {
              ops.load_token(go + sg.at(b, w.y[i], w.x[i], 0), sg.h, s, A(1), row);
            } else {
              ops.zero_token(s, row);
            }
          }
          const int64_t lse_base = (b * nW + win) * s.T;
          for (int64_t h = 0; h < s.heads; ++h) {
            const A* dOh = dO.data() + h * s.dpad;
            // A missing query's lane (and a padding lane) gets lse = +inf: P = 0 there, so it drops
            // out of every product.
            for (int64_t i = 0; i < s.Tpad; ++i) {
              row_lse[i] = i < s.T && w.exists[i] ? lse[(lse_base + i) * s.heads + h]
                                                  : std::numeric_limits<A>::infinity();
            }
            cpu::transpose<A>(dOh, ops.ld, s.Tpad, s.dpad, dOt.data(), s.Tpad);
            // Pt = exp(St - lse), dPt = V dO^T, dSt = Pt * (dPt - D), D[i] = sum_j Pt[j, i] dPt[j, i].
            scores_t(s, ops, w, h, Pt.data());
            column_exp(Pt.data(), s.T, s.Tpad, row_lse.data(), static_cast<A*>(nullptr));
            small_gemm<A, false>(s.T, s.Tpad, s.d, ops.v(h, s.dpad), ops.ld, dOt.data(), s.Tpad, dSt.data(), s.Tpad);
            for (int64_t i = 0; i < s.Tpad; i += W) {
              Vec<A> acc(A(0));
              for (int64_t j = 0; j < s.T; ++j) {
                acc = at::vec::fmadd(Vec<A>::loadu(Pt.data() + j * s.Tpad + i),
                                     Vec<A>::loadu(dSt.data() + j * s.Tpad + i), acc);
              }
              for (int64_t j = 0; j < s.T; ++j) {
                A* ds = dSt.data() + j * s.Tpad + i;
                (Vec<A>::loadu(Pt.data() + j * s.Tpad + i) * (Vec<A>::loadu(ds) - acc)).store(ds);
              }
            }
            if (part != nullptr) cpu::add_into(part + h * TT, dSt.data(), TT);
            // dQ = scale dS K (dS = dSt^T, read by columns).
            small_gemm<A, true>(s.T, s.dpad, s.T, dSt.data(), s.Tpad, ops.k(h, s.dpad), ops.ld, G.data(), s.dpad);
            for (int64_t i = 0; i < s.T; ++i) {
              if (!w.exists[i]) continue;
              const A* gr = G.data() + i * s.dpad;
              if (p.global_q) {
                cpu::add_into(dq_global.data() + (h * s.T + i) * s.dpad, gr, s.dpad);
              } else {
                store_row(gr, s.d, scale, dqp + sq.at(b, w.y[i], w.x[i], h));
              }
            }
            // dV = P^T dO = Pt dO, dK = dS^T Qs = dSt Qs.
            small_gemm<A, false>(s.T, s.dpad, s.T, Pt.data(), s.Tpad, dOh, ops.ld, G.data(), s.dpad);
            for (int64_t j = 0; j < s.T; ++j) {
              if (w.exists[j]) store_row(G.data() + j * s.dpad, s.d, A(1), dvp + sv.at(b, w.y[j], w.x[j], h));
            }
            small_gemm<A, false>(s.T, s.dpad, s.T, dSt.data(), s.Tpad, ops.qs(h, s.dpad), ops.ld, G.data(), s.dpad);
            for (int64_t j = 0; j < s.T; ++j) {
              if (w.exists[j]) store_row(G.data() + j * s.dpad, s.d, A(1), dkp + sk.at(b, w.y[j], w.x[j], h));
            }
          }
        }
        if (p.global_q) {
          for (int64_t h = 0; h < s.heads; ++h)
            for (int64_t t = 0; t < s.T; ++t)
              store_row(dq_global.data() + (h * s.T + t) * s.dpad, s.d, scale,
                        dqp + sq.at(b, t / g.ww, t % g.ww, h));
        }
      }
    }
  });

  if (has_bias) {
    std::vector<A> total(s.heads * TT, A(0));
    for (int64_t c = 0; c < chunks; ++c) cpu::add_into(total.data(), dS_part.data() + c * s.heads * TT, s.heads * TT);
    std::vector<A> table(g.table_size() * s.heads, A(0));
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t i = 0; i < s.T; ++i)
        for (int64_t j = 0; j < s.T; ++j)
          table[s.rel[i * s.T + j] * s.heads + h] += total[h * TT + j * s.Tpad + i];
    scalar_t* out = dbias.mutable_data_ptr<scalar_t>();
    for (size_t r = 0; r < table.size(); ++r) out[r] = static_cast<scalar_t>(table[r]);
  }
}

void forward(const Problem& p, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.k.scalar_type(), "window_attention",
                                  [&] { forward_typed<scalar_t>(p, out, lse); });
}

void backward(const Problem& p, const at::Tensor& grad, const at::Tensor& lse, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.k.scalar_type(),
                                  "window_attention_backward",
                                  [&] { backward_typed<scalar_t>(p, grad, lse, dq, dk, dv, dbias); });
}

}  // namespace

TM_DEFINE_KERNELS(TM_CPU_KERNELS(window_attention), &forward, &backward)

}  // namespace window_attention
}  // namespace tokenmix
