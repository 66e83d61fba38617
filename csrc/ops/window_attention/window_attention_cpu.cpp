// CPU kernels of windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net local).
//
// Fuses roll + pad + window partition + scaled QK^T + relative position bias + region mask +
// softmax + PV + window reverse + crop + reverse roll: one task per (image, window), heads inside,
// tokens read from and written to their original map positions through window_attention_math.h.
// Per head, the window's Q (pre-scaled), K^T and V are gathered into small padded buffers in cache
// and every product is a register-blocked vector x matrix loop (vec_mat). No [T, T] matrix leaves
// the task.
// Forward saves the row log-sum-exp; backward recomputes P from it.
//
// Backward is deterministic: dq/dk/dv rows belong to exactly one window; the bias-table gradient
// (and the global query's, summed over its image's windows) is accumulated per task in a fixed
// order and the per-task partials are summed in task order. Tasks never depend on thread count.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "window_attention_problem.h"

namespace tokenmix {
namespace window_attention {
namespace {

template <typename A>
using Vec = at::vec::Vectorized<A>;

int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// Register-blocked row x matrix products. One call computes R (1 or 2) output rows
// out_r[0, NB W) = sum_{c < m} a_r[c] * M[c * ld + (0, NB W)]; two rows share every load of M and
// give the FMA units 2 NB independent chains.
template <typename A, int R, int NB>
inline void vec_mat_block(const A* a0, const A* a1, int64_t m, const A* M, int64_t ld, A* o0,
                          A* o1, const A* i0, const A* i1) {
  constexpr int64_t W = Vec<A>::size();
  Vec<A> acc0[NB], acc1[NB];
  for (int nb = 0; nb < NB; ++nb) {
    acc0[nb] = i0 != nullptr ? Vec<A>::loadu(i0 + nb * W) : Vec<A>(A(0));
    acc1[nb] = (R == 2 && i1 != nullptr) ? Vec<A>::loadu(i1 + nb * W) : Vec<A>(A(0));
  }
  for (int64_t c = 0; c < m; ++c) {
    const A* row = M + c * ld;
    const Vec<A> b0(a0[c]);
    const Vec<A> b1(R == 2 ? a1[c] : A(0));
    for (int nb = 0; nb < NB; ++nb) {
      const Vec<A> mv = Vec<A>::loadu(row + nb * W);
      acc0[nb] = at::vec::fmadd(b0, mv, acc0[nb]);
      if (R == 2) acc1[nb] = at::vec::fmadd(b1, mv, acc1[nb]);
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    acc0[nb].store(o0 + nb * W);
    if (R == 2) acc1[nb].store(o1 + nb * W);
  }
}

// R rows over all of [0, npad), npad a multiple of the vector width; the accumulators start from
// the rows i0, i1 when given (e.g. an additive bias), else from zero.
template <typename A, int R>
void vec_mat_rows(const A* a0, const A* a1, int64_t m, const A* M, int64_t ld, int64_t npad, A* o0,
                  A* o1, const A* i0, const A* i1) {
  constexpr int64_t W = Vec<A>::size();
  constexpr int kMax = R == 1 ? 8 : 4;
  auto at = [](auto* p, int64_t n) { return p != nullptr ? p + n : p; };
  int64_t n0 = 0;
  for (; n0 + kMax * W <= npad; n0 += kMax * W) {
    vec_mat_block<A, R, kMax>(a0, a1, m, M + n0, ld, o0 + n0, at(o1, n0), at(i0, n0), at(i1, n0));
  }
  switch ((npad - n0) / W) {
#define TM_TAIL(nb)                                                                       \
  case nb:                                                                                \
    vec_mat_block<A, R, (nb < kMax ? nb : 1)>(a0, a1, m, M + n0, ld, o0 + n0, at(o1, n0), \
                                              at(i0, n0), at(i1, n0));                    \
    break;
    TM_TAIL(1) TM_TAIL(2) TM_TAIL(3) TM_TAIL(4) TM_TAIL(5) TM_TAIL(6) TM_TAIL(7)
#undef TM_TAIL
    default:
      break;
  }
}

// out[r, 0:npad) = init[r, 0:npad) + a[r, 0:m) . M for r < rows (row strides lda, ldo, the same
// ldo for init, which may be null for zero): a small GEMM, two rows at a time.
template <typename A>
void mat_mat(const A* a, int64_t lda, int64_t rows, int64_t m, const A* M, int64_t ld,
             int64_t npad, A* out, int64_t ldo, const A* init = nullptr) {
  auto row = [&](int64_t r) { return init != nullptr ? init + r * ldo : nullptr; };
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    vec_mat_rows<A, 2>(a + r * lda, a + (r + 1) * lda, m, M, ld, npad, out + r * ldo,
                       out + (r + 1) * ldo, row(r), row(r + 1));
  }
  if (r < rows) {
    vec_mat_rows<A, 1>(a + r * lda, nullptr, m, M, ld, npad, out + r * ldo, nullptr, row(r), nullptr);
  }
}

template <typename A>
A vec_max(const A* x, int64_t npad) {
  constexpr int64_t W = Vec<A>::size();
  Vec<A> m(-std::numeric_limits<A>::infinity());
  for (int64_t j = 0; j < npad; j += W) m = at::vec::maximum(m, Vec<A>::loadu(x + j));
  return at::vec::vec_reduce_all<A>([](const Vec<A>& a, const Vec<A>& b) { return at::vec::maximum(a, b); }, m);
}

// x[j] = exp(x[j] - shift); returns the sum.
template <typename A>
A vec_exp_sum(A* x, A shift, int64_t npad) {
  constexpr int64_t W = Vec<A>::size();
  const Vec<A> vs(shift);
  Vec<A> acc(A(0));
  for (int64_t j = 0; j < npad; j += W) {
    const Vec<A> e = (Vec<A>::loadu(x + j) - vs).exp_u20();
    e.store(x + j);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<A>([](const Vec<A>& a, const Vec<A>& b) { return a + b; }, acc);
}

template <typename scalar_t, typename A>
void load_row(const scalar_t* src, int64_t d, A mul, A* dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<A>(src[c]) * mul;
}

template <typename scalar_t, typename A>
void store_row(const A* src, int64_t d, A mul, scalar_t* dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(src[c] * mul);
}

// Element offsets of a [B, H, W, heads, d] (or window-shaped) tensor with unit last stride.
struct Strides {
  int64_t b, y, x, h;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), y(t.stride(1)), x(t.stride(2)), h(t.stride(3)) {}
  int64_t at(int64_t bb, int64_t yy, int64_t xx, int64_t hh) const { return bb * b + yy * y + xx * x + hh * h; }
};

// Where the tokens of one window live: original coordinates, existence and Swin region.
struct WindowTokens {
  std::vector<int64_t> y, x;
  std::vector<uint8_t> exists;
  std::vector<int> region;
  bool masked = false;  // some query/key pair is excluded (partial window or several regions)

  void build(const Geometry& g, int64_t win) {
    const int64_t T = g.tokens();
    y.resize(T);
    x.resize(T);
    exists.resize(T);
    region.resize(T);
    masked = false;
    for (int64_t t = 0; t < T; ++t) {
      int64_t sy, sx;
      exists[t] = shifted_coords(g, win, t, &sy, &sx);
      y[t] = exists[t] ? original_row(g, sy) : 0;
      x[t] = exists[t] ? original_col(g, sx) : 0;
      region[t] = exists[t] ? window_attention::region(g, sy, sx) : -1;
      masked = masked || !exists[t] || region[t] != region[0];
    }
  }
};

// Per-call constants: padded sizes, the relative index and each head's [T, Tpad] bias matrix.
template <typename A>
struct Setup {
  int64_t T, Tpad, d, dpad, heads;
  std::vector<int64_t> rel;  // [T * T]
  std::vector<A> bias;       // [heads, T, Tpad], zero when there is no table
};

template <typename scalar_t, typename A>
Setup<A> make_setup(const Problem& p) {
  const Geometry& g = p.geo;
  constexpr int64_t W = Vec<A>::size();
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
  if (p.bias_table.defined()) {
    const at::Tensor table = p.bias_table.contiguous();
    const scalar_t* tb = table.const_data_ptr<scalar_t>();
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t i = 0; i < s.T; ++i)
        for (int64_t j = 0; j < s.T; ++j)
          s.bias[(h * s.T + i) * s.Tpad + j] = static_cast<A>(tb[s.rel[i * s.T + j] * s.heads + h]);
  }
  return s;
}

// Scores of every query row against every key: S[i, j] = qs_i . k_j + bias, -inf at masked keys
// and at the padding j >= T. S is [T, Tpad].
template <typename A>
void score_matrix(const Setup<A>& s, const WindowTokens& w, int64_t h, const A* Qs, const A* Kt,
                  A* S) {
  mat_mat(Qs, s.dpad, s.T, s.d, Kt, s.Tpad, s.Tpad, S, s.Tpad, s.bias.data() + h * s.T * s.Tpad);
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < s.T; ++i) {
    A* row = S + i * s.Tpad;
    if (w.masked) {
      for (int64_t j = 0; j < s.T; ++j) {
        if (!w.exists[j] || w.region[j] != w.region[i]) row[j] = kNegInf;
      }
    }
    for (int64_t j = s.T; j < s.Tpad; ++j) row[j] = kNegInf;
  }
}

// The window's operands, every head, in task-local buffers: per head h, Qs = scale * q
// [T, dpad], Kt = k^T [d, Tpad], V [T, dpad]; when `for_backward`, also K [T, dpad] and
// Vt [d, Tpad]. Each token's heads are read in one pass over its memory (q, k, v usually are
// views of one packed qkv row). Missing tokens (partial windows) and paddings are zeros: clear()
// once per window, since every gather overwrites exactly the same entries.
template <typename scalar_t, typename A>
struct Operands {
  std::vector<A> Qs, Kt, V, K, Vt;
  int64_t row_stride = 0, t_stride = 0;  // per-head strides of the [T, dpad] / [d, Tpad] buffers

  const A* qs(int64_t h) const { return Qs.data() + h * row_stride; }
  const A* kt(int64_t h) const { return Kt.data() + h * t_stride; }
  const A* v(int64_t h) const { return V.data() + h * row_stride; }
  const A* k(int64_t h) const { return K.data() + h * row_stride; }
  const A* vt(int64_t h) const { return Vt.data() + h * t_stride; }

  void clear(const Setup<A>& s, bool for_backward) {
    row_stride = s.T * s.dpad;
    t_stride = s.d * s.Tpad;
    Qs.assign(s.heads * row_stride, A(0));
    Kt.assign(s.heads * t_stride, A(0));
    V.assign(s.heads * row_stride, A(0));
    if (for_backward) {
      K.assign(s.heads * row_stride, A(0));
      Vt.assign(s.heads * t_stride, A(0));
    }
  }

  void gather(const Problem& p, const Setup<A>& s, const WindowTokens& w, int64_t b,
              bool for_backward) {
    const Strides sq(p.q), sk(p.k), sv(p.v);
    const scalar_t* q = p.q.const_data_ptr<scalar_t>();
    const scalar_t* k = p.k.const_data_ptr<scalar_t>();
    const scalar_t* v = p.v.const_data_ptr<scalar_t>();
    const A scale = static_cast<A>(p.scale);
    const int64_t ww = p.geo.ww;
    for (int64_t t = 0; t < s.T; ++t) {
      for (int64_t h = 0; h < s.heads; ++h) {
        A* qs_row = Qs.data() + h * row_stride + t * s.dpad;
        if (p.global_q) {
          load_row(q + sq.at(b, t / ww, t % ww, h), s.d, scale, qs_row);
        } else if (w.exists[t]) {
          load_row(q + sq.at(b, w.y[t], w.x[t], h), s.d, scale, qs_row);
        }
        if (!w.exists[t]) continue;
        const scalar_t* kr = k + sk.at(b, w.y[t], w.x[t], h);
        const scalar_t* vr = v + sv.at(b, w.y[t], w.x[t], h);
        load_row(vr, s.d, A(1), V.data() + h * row_stride + t * s.dpad);
        A* kt = Kt.data() + h * t_stride;
        for (int64_t c = 0; c < s.d; ++c) kt[c * s.Tpad + t] = static_cast<A>(kr[c]);
        if (for_backward) {
          load_row(kr, s.d, A(1), K.data() + h * row_stride + t * s.dpad);
          A* vt = Vt.data() + h * t_stride;
          for (int64_t c = 0; c < s.d; ++c) vt[c * s.Tpad + t] = static_cast<A>(vr[c]);
        }
      }
    }
  }
};

template <typename scalar_t>
void forward_typed(const Problem& p, at::Tensor& out, at::Tensor& lse_t) {
  using A = at::opmath_type<scalar_t>;
  const Geometry& g = p.geo;
  const Setup<A> s = make_setup<scalar_t, A>(p);
  const int64_t B = p.k.size(0), nW = g.windows();
  const Strides so(out);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  A* lse = lse_t.defined() ? lse_t.mutable_data_ptr<A>() : nullptr;
  at::parallel_for(0, B * nW, 1, [&](int64_t begin, int64_t end) {
    WindowTokens w;
    Operands<scalar_t, A> ops;
    std::vector<A> S(s.T * s.Tpad), O(s.T * s.dpad), inv_sum(s.T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nW, win = task % nW;
      w.build(g, win);
      ops.clear(s, false);
      ops.gather(p, s, w, b, false);
      for (int64_t h = 0; h < s.heads; ++h) {
        score_matrix(s, w, h, ops.qs(h), ops.kt(h), S.data());
        for (int64_t i = 0; i < s.T; ++i) {
          A* row = S.data() + i * s.Tpad;
          if (!w.exists[i]) {
            std::fill(row, row + s.Tpad, A(0));
            inv_sum[i] = A(0);
            if (lse != nullptr) lse[(task * s.T + i) * s.heads + h] = A(0);
            continue;
          }
          const A m = vec_max(row, s.Tpad);
          const A sum = vec_exp_sum(row, m, s.Tpad);
          inv_sum[i] = A(1) / sum;
          if (lse != nullptr) lse[(task * s.T + i) * s.heads + h] = m + std::log(sum);
        }
        mat_mat(S.data(), s.Tpad, s.T, s.T, ops.v(h), s.dpad, s.dpad, O.data(), s.dpad);
        for (int64_t i = 0; i < s.T; ++i) {
          if (w.exists[i]) store_row(O.data() + i * s.dpad, s.d, inv_sum[i], o + so.at(b, w.y[i], w.x[i], h));
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const Problem& p, const at::Tensor& grad, const at::Tensor& lse_t,
                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
  using A = at::opmath_type<scalar_t>;
  const Geometry& g = p.geo;
  const Setup<A> s = make_setup<scalar_t, A>(p);
  const int64_t B = p.k.size(0), nW = g.windows(), table = g.table_size();
  // A task is one window, or, for a global query, all windows of one image (its gradient is a
  // sum over them, accumulated in window order inside the task).
  const int64_t per_task = p.global_q ? nW : 1;
  const int64_t tasks = B * nW / per_task;
  const bool has_bias = p.bias_table.defined();
  std::vector<A> dbias_part(has_bias ? tasks * s.heads * table : 0, A(0));
  const Strides sg(grad), sq(dq), sk(dk), sv(dv);
  const scalar_t* go = grad.const_data_ptr<scalar_t>();
  const A* lse = lse_t.const_data_ptr<A>();
  scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
  const A scale = static_cast<A>(p.scale);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    WindowTokens w;
    Operands<scalar_t, A> ops;
    const int64_t TT = s.T * s.Tpad;
    std::vector<A> dO(s.T * s.dpad), P(TT), dP(TT), Pt(TT), dSt(TT), G(s.T * s.dpad), dq_global;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task * per_task / nW;
      if (p.global_q) dq_global.assign(s.heads * s.T * s.dpad, A(0));
      for (int64_t win = task * per_task % nW, n = 0; n < per_task; ++n, ++win) {
        w.build(g, win);
        ops.clear(s, true);
        ops.gather(p, s, w, b, true);
        const int64_t lse_base = (b * nW + win) * s.T;
        for (int64_t h = 0; h < s.heads; ++h) {
          std::fill(dO.begin(), dO.end(), A(0));
          for (int64_t i = 0; i < s.T; ++i) {
            if (w.exists[i]) load_row(go + sg.at(b, w.y[i], w.x[i], h), s.d, A(1), dO.data() + i * s.dpad);
          }
          // P = exp(S - lse), dP = dO V^T; missing query rows get P = 0 and drop out.
          score_matrix(s, w, h, ops.qs(h), ops.kt(h), P.data());
          mat_mat(dO.data(), s.dpad, s.T, s.d, ops.vt(h), s.Tpad, s.Tpad, dP.data(), s.Tpad);
          A* db = has_bias ? dbias_part.data() + (task * s.heads + h) * table : nullptr;
          for (int64_t i = 0; i < s.T; ++i) {
            A* pr = P.data() + i * s.Tpad;
            A* dr = dP.data() + i * s.Tpad;
            if (!w.exists[i]) {
              std::fill(pr, pr + s.Tpad, A(0));
              std::fill(dr, dr + s.Tpad, A(0));
            } else {
              vec_exp_sum(pr, lse[(lse_base + i) * s.heads + h], s.Tpad);
              A D(0);
              for (int64_t j = 0; j < s.T; ++j) D += pr[j] * dr[j];
              for (int64_t j = 0; j < s.T; ++j) dr[j] = pr[j] * (dr[j] - D);  // dS
              if (db != nullptr) {
                const int64_t* rel = s.rel.data() + i * s.T;
                for (int64_t j = 0; j < s.T; ++j) db[rel[j]] += dr[j];
              }
            }
            for (int64_t j = 0; j < s.T; ++j) {
              Pt[j * s.Tpad + i] = pr[j];
              dSt[j * s.Tpad + i] = dr[j];
            }
          }
          // dQ = scale dS K (rows of missing queries are zero and never stored).
          mat_mat(dP.data(), s.Tpad, s.T, s.T, ops.k(h), s.dpad, s.dpad, G.data(), s.dpad);
          for (int64_t i = 0; i < s.T; ++i) {
            if (!w.exists[i]) continue;
            const A* gr = G.data() + i * s.dpad;
            if (p.global_q) {
              A* gq = dq_global.data() + (h * s.T + i) * s.dpad;
              for (int64_t c = 0; c < s.d; ++c) gq[c] += gr[c];
            } else {
              store_row(gr, s.d, scale, dqp + sq.at(b, w.y[i], w.x[i], h));
            }
          }
          // dV = P^T dO, dK = dS^T Qs.
          mat_mat(Pt.data(), s.Tpad, s.T, s.T, dO.data(), s.dpad, s.dpad, G.data(), s.dpad);
          for (int64_t j = 0; j < s.T; ++j) {
            if (w.exists[j]) store_row(G.data() + j * s.dpad, s.d, A(1), dvp + sv.at(b, w.y[j], w.x[j], h));
          }
          mat_mat(dSt.data(), s.Tpad, s.T, s.T, ops.qs(h), s.dpad, s.dpad, G.data(), s.dpad);
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
  });

  if (has_bias) {
    scalar_t* out = dbias.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < table; ++r) {
      for (int64_t h = 0; h < s.heads; ++h) {
        A sum(0);
        for (int64_t t = 0; t < tasks; ++t) sum += dbias_part[(t * s.heads + h) * table + r];
        out[r * s.heads + h] = static_cast<scalar_t>(sum);
      }
    }
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
