// CPU kernels of the sparse-token gather family (DynamicViT).
//
// Row copies (gather, scatter and their backwards) are memcpy of whole [C] rows, parallel over
// rows. policy_softmax is fused per attention row: max, exp, policy weighting, normalisation and
// (backward) the row dot products run over the row while it sits in L1, at::vec inner loops, with
// no [B, H, N, N] intermediate. The policy gradient is summed per fixed chunk of rows and then
// over chunks in a fixed order, so no result depends on the thread count.
//
// This file is compiled once per CPU capability (see cpu_capability.h); nothing here may have
// external linkage except the kernel-table function.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "gather_problem.h"

namespace tokenmix {
namespace gather {
namespace {

// Rows per parallel task: enough bytes that a task outweighs the scheduling cost.
int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_bytes));
}

void gather_rows(const at::Tensor& x, const at::Tensor& index, at::Tensor& out) {
  const int64_t B = index.size(0), K = index.size(1), C = x.size(2);
  const int64_t elem = x.element_size();
  const int64_t row_bytes = C * elem;
  const int64_t sb = x.stride(0) * elem, sn = x.stride(1) * elem;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  at::parallel_for(0, B * K, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K;
      std::memcpy(dst + r * row_bytes, src + b * sb + idx[r] * sn, row_bytes);
    }
  });
}

Inverse inverse(const at::Tensor& index, int64_t N) {
  const auto opts = index.options().dtype(at::kInt);
  Inverse inv{at::empty({index.size(0), N}, opts), at::empty({index.size(0), N}, opts)};
  const int64_t B = index.size(0), K = index.size(1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  int32_t* cnt = inv.count.mutable_data_ptr<int32_t>();
  int32_t* fst = inv.first.mutable_data_ptr<int32_t>();
  // A few thousand integer steps per batch: small problems run inline rather than pay for waking
  // the pool.
  at::parallel_for(0, B, std::max<int64_t>(1, (int64_t{1} << 15) / (N + K)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int32_t* c = cnt + b * N;
      int32_t* f = fst + b * N;
      std::fill(c, c + N, 0);
      std::fill(f, f + N, kNoEntry);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = idx[b * K + k];
        if (c[n]++ == 0) {
          f[n] = static_cast<int32_t>(k);
        }
      }
    }
  });
  return inv;
}

template <typename scalar_t>
void sum_rows(const scalar_t* rows, const int64_t* idx_b, int64_t first, int64_t K, int64_t n,
              int64_t C, scalar_t* out, std::vector<at::opmath_type<scalar_t>>& acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  acc.assign(C, opmath_t(0));
  for (int64_t k = first; k < K; ++k) {
    if (idx_b[k] != n) continue;
    const scalar_t* row = rows + k * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<opmath_t>(row[c]);
  }
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
}

void compose(RowMode mode, const at::Tensor& rows, const at::Tensor& self,
             const at::Tensor& index, const Inverse& inv, at::Tensor& out) {
  const int64_t B = out.size(0), N = out.size(1), C = out.size(2), K = index.size(1);
  const int64_t elem = out.element_size();
  const int64_t row_bytes = C * elem;
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const int32_t* cnt = inv.count.const_data_ptr<int32_t>();
  const int32_t* fst = inv.first.const_data_ptr<int32_t>();
  const char* rows_p = rows.defined() ? static_cast<const char*>(rows.const_data_ptr()) : nullptr;
  const char* self_p = self.defined() ? static_cast<const char*>(self.const_data_ptr()) : nullptr;
  const int64_t self_sb = self.defined() ? self.stride(0) * elem : 0;
  const int64_t self_sn = self.defined() ? self.stride(1) * elem : 0;
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "compose_rows", [&] {
    at::parallel_for(0, B * N, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> acc;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, n = r % N;
        char* o = dst + r * row_bytes;
        switch (row_source(mode, cnt[r])) {
          case RowSource::Zero:
            std::memset(o, 0, row_bytes);
            break;
          case RowSource::Self:
            std::memcpy(o, self_p + b * self_sb + n * self_sn, row_bytes);
            break;
          case RowSource::First:
            std::memcpy(o, rows_p + (b * K + fst[r]) * row_bytes, row_bytes);
            break;
          case RowSource::Sum:
            sum_rows(reinterpret_cast<const scalar_t*>(rows_p) + b * K * C, idx + b * K, fst[r], K,
                     n, C, reinterpret_cast<scalar_t*>(o), acc);
            break;
        }
      }
    });
  });
}

void topk_index(const at::Tensor& score, int64_t k, int64_t keep_first, at::Tensor& index) {
  const int64_t B = score.size(0), M = score.size(1), L = keep_first + k;
  const int64_t sb = score.stride(0), sm = score.stride(1);
  int64_t* out = index.mutable_data_ptr<int64_t>();
  struct Entry {
    uint64_t key;
    int64_t pos;
    bool operator<(const Entry& o) const { return ranks_before(key, pos, o.key, o.pos); }
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "topk_index", [&] {
    const scalar_t* s = score.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<Entry> entries(M);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = s + b * sb;
        for (int64_t q = 0; q < M; ++q) {
          entries[q] = {rank_key(static_cast<double>(row[q * sm])), q};
        }
        std::nth_element(entries.begin(), entries.begin() + k, entries.end());
        std::sort(entries.begin(), entries.begin() + k);
        int64_t* o = out + b * L;
        for (int64_t t = 0; t < keep_first; ++t) o[t] = t;
        for (int64_t t = 0; t < k; ++t) o[keep_first + t] = keep_first + entries[t].pos;
      }
    });
  });
}

// ---- policy_softmax -------------------------------------------------------------------------

template <typename A>
using Vec = at::vec::Vectorized<A>;

template <typename A>
A row_max(const A* x, int64_t n) {
  const int64_t W = Vec<A>::size();
  Vec<A> m(-std::numeric_limits<A>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) m = at::vec::maximum(m, Vec<A>::loadu(x + j));
  A out = at::vec::vec_reduce_all<A>([](const Vec<A>& a, const Vec<A>& b) { return at::vec::maximum(a, b); }, m);
  for (; j < n; ++j) out = (x[j] > out || x[j] != x[j]) ? x[j] : out;
  return out;
}

// e[j] = exp(l[j] - m) for j in [0, n); returns sum_j e[j] * w[j] with w = policy except w[i] = 1.
template <typename A>
A exp_and_weighted_sum(const A* l, const A* P, A m, int64_t n, int64_t i, A* e) {
  const int64_t W = Vec<A>::size();
  const Vec<A> vm(m);
  Vec<A> acc(A(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<A> ej = (Vec<A>::loadu(l + j) - vm).exp();
    ej.store(e + j);
    acc = acc + ej * Vec<A>::loadu(P + j);
  }
  A tail(0);
  for (; j < n; ++j) {
    e[j] = std::exp(l[j] - m);
    tail += e[j] * P[j];
  }
  const A s = at::vec::vec_reduce_all<A>([](const Vec<A>& a, const Vec<A>& b) { return a + b; }, acc) + tail;
  // The diagonal weight is 1, not P[i].
  return s + e[i] * (A(1) - P[i]);
}

template <typename A>
void policy_forward_row(const A* l, const A* P, int64_t N, int64_t i, A eps, A* out) {
  const A m = row_max(l, N);
  const A S = exp_and_weighted_sum(l, P, m, N, i, out);
  const A denom = S + eps;
  const A eps_n = eps / static_cast<A>(N);
  const int64_t W = Vec<A>::size();
  const A e_i = out[i];
  const Vec<A> vd(denom), ve(eps_n);
  int64_t j = 0;
  for (; j + W <= N; j += W) {
    ((Vec<A>::loadu(out + j) * Vec<A>::loadu(P + j) + ve) / vd).store(out + j);
  }
  for (; j < N; ++j) out[j] = policy_out(out[j] * P[j], eps_n, denom);
  out[i] = policy_out(e_i * policy_weight(P[i], true), eps_n, denom);
}

// One backward row: writes dl[0..N) and adds this row's policy gradient into dP[0..N).
// e is scratch of N elements.
template <typename A>
void policy_backward_row(const A* g, const A* l, const A* P, int64_t N, int64_t i, A eps, A* dl,
                         A* dP, A* e) {
  const int64_t W = Vec<A>::size();
  const A m = row_max(l, N);
  const A S = exp_and_weighted_sum(l, P, m, N, i, e);
  const A denom = S + eps;
  const A eps_n = eps / static_cast<A>(N);
  // r = sum_j g_j out_j and sum_g_a = sum_j g_j a_j, with a_j = e_j P_j off the diagonal.
  Vec<A> acc_ga(A(0)), acc_g(A(0));
  int64_t j = 0;
  for (; j + W <= N; j += W) {
    const Vec<A> gj = Vec<A>::loadu(g + j);
    acc_ga = acc_ga + gj * Vec<A>::loadu(e + j) * Vec<A>::loadu(P + j);
    acc_g = acc_g + gj;
  }
  auto sum = [](const Vec<A>& a, const Vec<A>& b) { return a + b; };
  A sum_g_a = at::vec::vec_reduce_all<A>(sum, acc_ga);
  A sum_g = at::vec::vec_reduce_all<A>(sum, acc_g);
  for (; j < N; ++j) {
    sum_g_a += g[j] * e[j] * P[j];
    sum_g += g[j];
  }
  sum_g_a += g[i] * e[i] * (A(1) - P[i]);
  const A r = (sum_g_a + eps_n * sum_g) / denom;
  const A max_grad = policy_max_grad(sum_g_a, r, S, denom);

  // dl_j = ga_j e_j P_j, dP_j += ga_j e_j, except at the diagonal (w = 1, no policy gradient).
  const Vec<A> vr(r), vd(denom);
  auto span = [&](int64_t lo, int64_t hi) {
    int64_t t = lo;
    for (; t + W <= hi; t += W) {
      const Vec<A> ga_e = (Vec<A>::loadu(g + t) - vr) / vd * Vec<A>::loadu(e + t);
      (ga_e * Vec<A>::loadu(P + t)).store(dl + t);
      (Vec<A>::loadu(dP + t) + ga_e).store(dP + t);
    }
    for (; t < hi; ++t) {
      const A ga_e = policy_grad_a(g[t], r, denom) * e[t];
      dl[t] = ga_e * P[t];
      dP[t] += ga_e;
    }
  };
  span(0, i);
  span(i + 1, N);
  dl[i] = policy_grad_a(g[i], r, denom) * e[i] * policy_weight(P[i], true);
  // The gradient through m = max_j l_j goes to the first maximum, as torch.max's does.
  const int64_t argmax = std::find(l, l + N, m) - l;
  if (argmax < N) dl[argmax] -= max_grad;
}

// Rows of reduced-precision inputs are widened into per-task buffers; A-typed rows are used
// in place.
template <typename scalar_t, typename A>
const A* widen(const scalar_t* src, int64_t n, std::vector<A>& buf) {
  if constexpr (std::is_same_v<scalar_t, A>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(src[j]);
    return buf.data();
  }
}

template <typename scalar_t, typename A>
void narrow_row(const A* src, int64_t n, scalar_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

template <typename scalar_t>
void policy_forward_typed(const at::Tensor& logits, const at::Tensor& policy, double eps,
                          at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), H = logits.size(1), N = logits.size(2);
  const scalar_t* l = logits.const_data_ptr<scalar_t>();
  const scalar_t* p = policy.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * H * N, row_grain(N * sizeof(A)), [&](int64_t begin, int64_t end) {
    std::vector<A> lbuf, pbuf, obuf(N);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * N), i = row % N;
      const A* lr = widen(l + row * N, N, lbuf);
      const A* pr = widen(p + b * N, N, pbuf);
      if constexpr (std::is_same_v<scalar_t, A>) {
        policy_forward_row(lr, pr, N, i, static_cast<A>(eps), o + row * N);
      } else {
        policy_forward_row(lr, pr, N, i, static_cast<A>(eps), obuf.data());
        narrow_row(obuf.data(), N, o + row * N);
      }
    }
  });
}

template <typename scalar_t>
void policy_backward_typed(const at::Tensor& grad_out, const at::Tensor& logits,
                           const at::Tensor& policy, double eps, at::Tensor& grad_logits,
                           at::Tensor& grad_policy) {
  using A = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), H = logits.size(1), N = logits.size(2);
  const int64_t R = kPolicyRowsPerChunk;
  const int64_t chunks = (N + R - 1) / R;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* l = logits.const_data_ptr<scalar_t>();
  const scalar_t* p = policy.const_data_ptr<scalar_t>();
  scalar_t* dl = grad_logits.mutable_data_ptr<scalar_t>();
  // partial[b, h, c, :]: policy gradient of rows [c R, c R + R) of slice (b, h).
  std::vector<A> partial(static_cast<size_t>(B * H * chunks * N), A(0));
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> gbuf, lbuf, pbuf, dlbuf(N), e(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, c = task % chunks, b = bh / H;
      const A* pr = widen(p + b * N, N, pbuf);
      A* dP = partial.data() + task * N;
      for (int64_t i = c * R; i < std::min(N, c * R + R); ++i) {
        const int64_t row = bh * N + i;
        const A* gr = widen(g + row * N, N, gbuf);
        const A* lr = widen(l + row * N, N, lbuf);
        if constexpr (std::is_same_v<scalar_t, A>) {
          policy_backward_row(gr, lr, pr, N, i, static_cast<A>(eps), dl + row * N, dP, e.data());
        } else {
          policy_backward_row(gr, lr, pr, N, i, static_cast<A>(eps), dlbuf.data(), dP, e.data());
          narrow_row(dlbuf.data(), N, dl + row * N);
        }
      }
    }
  });
  scalar_t* dp = grad_policy.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / N, j = bj % N;
      A s(0);
      for (int64_t t = 0; t < H * chunks; ++t) s += partial[(b * H * chunks + t) * N + j];
      dp[bj] = static_cast<scalar_t>(s);
    }
  });
}

void policy_forward(const at::Tensor& logits, const at::Tensor& policy, double eps,
                    at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "policy_softmax",
                                  [&] { policy_forward_typed<scalar_t>(logits, policy, eps, out); });
}

void policy_backward(const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& policy,
                     double eps, at::Tensor& grad_logits, at::Tensor& grad_policy) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "policy_softmax_backward", [&] {
        policy_backward_typed<scalar_t>(grad_out, logits, policy, eps, grad_logits, grad_policy);
      });
}

}  // namespace

TM_DEFINE_KERNELS(TM_CPU_KERNELS(gather), &gather_rows, &inverse, &compose, &topk_index,
                  &policy_forward, &policy_backward)

}  // namespace gather
}  // namespace tokenmix
