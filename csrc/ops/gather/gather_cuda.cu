// CUDA kernels of the sparse-token gather family (DynamicViT). No torch headers: gather_cuda.cpp
// fills the params structs of gather_params.h.
//
// gather_rows / compose_rows: row copies as flat elementwise kernels over (row, word) pairs, with
//   the widest word (16 down to 1 bytes) that every address and row size allows. Each output row
//   is written exactly once, so backward needs no atomics on data and is deterministic; duplicate
//   indices (gather backward only) are summed in k order, in fp32 (fp64 for double).
// build_inverse: count/first of index rows with integer atomics (order-independent results).
// topk_index: one block per batch row; each candidate's rank is the number of candidates that
//   rank before it (gather_math.h), O(M^2) compares per row: meant for token counts of a few
//   thousand at most.
// policy_softmax: one warp per attention row (forward); backward, one warp per chunk of 32 rows
//   whose per-row statistics live in the lanes, then a fixed-order sum of the policy partials.
// Index values are checked here, on the device, so that no call waits for the device: an entry
// outside [0, N) (gather_rows, build_inverse) or a position listed twice in a scatter
// (compose_rows) stops the kernel with a device-side assertion (TM_DEVICE_CHECK) before any
// out-of-range address is formed. With TOKENMIX_CUDA_CHECK_INDICES=1 the launchers check on the
// host first and raise the CPU path's exact IndexError / ValueError (one synchronisation a call).

#include <climits>
#include <cstdint>

#include "gather_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace gather {
namespace {

using namespace cu;

// Widest word (16, 8, 4, 2, 1 bytes) that divides every value (addresses, strides, row sizes).
int word_bytes(const uint64_t* values, int n) {
  int w = 16;
  for (int i = 0; i < n; ++i) {
    while (w > 1 && values[i] % w != 0) w /= 2;
  }
  return w;
}

template <typename F>
void dispatch_word(int bytes, F&& f) {
  switch (bytes) {
    case 16:
      f(uint4{});
      break;
    case 8:
      f(uint2{});
      break;
    case 4:
      f(uint32_t{});
      break;
    case 2:
      f(uint16_t{});
      break;
    default:
      f(uint8_t{});
      break;
  }
}

// ---- row copies -------------------------------------------------------------------------------

template <typename Word>
__global__ void gather_rows_kernel(const char* __restrict__ x, int64_t sb, int64_t sn,
                                   const int64_t* __restrict__ index, Word* __restrict__ out,
                                   int64_t N, int64_t K, int64_t words, int64_t total) {
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const int64_t r = t / words;
    const int64_t w = t - r * words;
    const int64_t n = index[r];
    TM_DEVICE_CHECK(n >= 0 && n < N, "tokenmix: index entries must lie in [0, N)");
    out[t] = reinterpret_cast<const Word*>(x + (r / K) * sb + n * sn)[w];
  }
}

template <typename T, typename Word>
__global__ void compose_rows_kernel(ComposeParams p, int64_t words, int64_t total) {
  using A = typename AccOf<T>::type;
  constexpr int kElems = sizeof(Word) >= sizeof(T) ? sizeof(Word) / sizeof(T) : 1;
  const int64_t row_bytes = p.C * static_cast<int64_t>(sizeof(T));
  const char* rows = static_cast<const char*>(p.rows);
  const char* self = static_cast<const char*>(p.self);
  Word* out = static_cast<Word*>(p.out);
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const int64_t r = t / words;
    const int64_t w = t - r * words;
    const int64_t b = r / p.N;
    const int64_t n = r - b * p.N;
    const int32_t first = p.first[r];
    TM_DEVICE_CHECK(p.mode != RowMode::Scatter || p.count[r] <= 1,
                    "tokenmix.scatter_tokens: index entries must be unique within each row");
    Word v{};
    switch (row_source(p.mode, p.count[r])) {
      case RowSource::Zero:
        break;
      case RowSource::Self:
        v = reinterpret_cast<const Word*>(self + (b * p.self_stride_b + n * p.self_stride_n) *
                                                     static_cast<int64_t>(sizeof(T)))[w];
        break;
      case RowSource::First:
        v = reinterpret_cast<const Word*>(rows + (b * p.K + first) * row_bytes)[w];
        break;
      case RowSource::Sum: {
        A acc[kElems];
        for (int e = 0; e < kElems; ++e) acc[e] = A(0);
        for (int64_t k = first; k < p.K; ++k) {
          if (p.index[b * p.K + k] != n) continue;
          const T* src = reinterpret_cast<const T*>(rows + (b * p.K + k) * row_bytes) + w * kElems;
          for (int e = 0; e < kElems; ++e) acc[e] += to_acc(src[e]);
        }
        T* dst = reinterpret_cast<T*>(out + t);
        for (int e = 0; e < kElems; ++e) dst[e] = from_acc<T>(acc[e]);
        continue;
      }
    }
    out[t] = v;
  }
}

__global__ void build_inverse_kernel(InverseParams p) {
  const int64_t total = p.B * p.K;
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const int64_t b = t / p.K;
    const int64_t n = p.index[t];
    TM_DEVICE_CHECK(n >= 0 && n < p.N, "tokenmix: index entries must lie in [0, N)");
    atomicAdd(p.count + b * p.N + n, 1);
    atomicMin(p.first + b * p.N + n, static_cast<int32_t>(t - b * p.K));
  }
}

// ---- topk -------------------------------------------------------------------------------------

template <typename T>
__global__ void topk_index_kernel(TopkParams p) {
  const T* score = static_cast<const T*>(p.score);
  const int64_t L = p.keep_first + p.k;
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const T* s = score + b * p.score_stride_b;
    int64_t* out = p.index + b * L;
    for (int64_t t = threadIdx.x; t < p.keep_first; t += blockDim.x) out[t] = t;
    for (int64_t pos = threadIdx.x; pos < p.M; pos += blockDim.x) {
      const uint64_t key = rank_key(to_acc(s[pos]));
      int64_t rank = 0;
      for (int64_t q = 0; q < p.M && rank < p.k; ++q) {
        rank += ranks_before(rank_key(to_acc(s[q])), q, key, pos) ? 1 : 0;
      }
      if (rank < p.k) out[p.keep_first + rank] = p.keep_first + pos;
    }
  }
}

// ---- policy_softmax ---------------------------------------------------------------------------

template <typename T>
__global__ void policy_forward_kernel(PolicySoftmaxParams p) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(p.logits);
  const T* policy = static_cast<const T*>(p.policy);
  T* out = static_cast<T*>(p.out);
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = p.B * p.H * p.N;
  const A eps = static_cast<A>(p.eps);
  const A eps_n = eps / static_cast<A>(p.N);
  for (int64_t row = global_thread() / kWarp; row < rows; row += thread_count() / kWarp) {
    const int64_t b = row / (p.H * p.N);
    const int64_t i = row % p.N;
    const T* l = logits + row * p.N;
    const T* P = policy + b * p.N;
    A m = neg_inf<A>();
    for (int64_t j = lane; j < p.N; j += kWarp) m = max_nan(m, to_acc(l[j]));
    m = warp_max(m);
    A s = 0;
    for (int64_t j = lane; j < p.N; j += kWarp) {
      s += acc_exp(to_acc(l[j]) - m) * policy_weight(to_acc(P[j]), j == i);
    }
    const A denom = warp_sum(s) + eps;
    for (int64_t j = lane; j < p.N; j += kWarp) {
      const A a = acc_exp(to_acc(l[j]) - m) * policy_weight(to_acc(P[j]), j == i);
      out[row * p.N + j] = from_acc<T>(policy_out(a, eps_n, denom));
    }
  }
}

template <typename T>
__global__ void policy_backward_kernel(PolicySoftmaxParams p) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(p.logits);
  const T* policy = static_cast<const T*>(p.policy);
  const T* grad = static_cast<const T*>(p.grad_out);
  T* grad_logits = static_cast<T*>(p.out);
  A* partial = static_cast<A*>(p.partial);
  const int lane = threadIdx.x % kWarp;
  const int64_t N = p.N;
  const int64_t chunks = (N + kPolicyRowsPerChunk - 1) / kPolicyRowsPerChunk;
  const int64_t tasks = p.B * p.H * chunks;
  const A eps = static_cast<A>(p.eps);
  const A eps_n = eps / static_cast<A>(N);
  for (int64_t task = global_thread() / kWarp; task < tasks; task += thread_count() / kWarp) {
    const int64_t bh = task / chunks;
    const int64_t i0 = (task % chunks) * kPolicyRowsPerChunk;
    const int64_t i1 = i0 + kPolicyRowsPerChunk < N ? i0 + kPolicyRowsPerChunk : N;
    const T* P = policy + (bh / p.H) * N;
    // Lane t keeps the statistics of row i0 + t.
    A my_m = 0, my_denom = 1, my_r = 0, my_max_grad = 0;
    long long my_argmax = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const T* l = logits + (bh * N + i) * N;
      const T* g = grad + (bh * N + i) * N;
      A m = neg_inf<A>();
      for (int64_t j = lane; j < N; j += kWarp) m = max_nan(m, to_acc(l[j]));
      m = warp_max(m);
      long long arg = LLONG_MAX;
      A s = 0, sum_g_a = 0, sum_g = 0;
      for (int64_t j = lane; j < N; j += kWarp) {
        const A lj = to_acc(l[j]);
        if (lj == m && arg == LLONG_MAX) arg = j;
        const A a = acc_exp(lj - m) * policy_weight(to_acc(P[j]), j == i);
        const A gj = to_acc(g[j]);
        s += a;
        sum_g_a += gj * a;
        sum_g += gj;
      }
      arg = warp_min(arg);
      s = warp_sum(s);
      sum_g_a = warp_sum(sum_g_a);
      sum_g = warp_sum(sum_g);
      const A denom = s + eps;
      const A r = (sum_g_a + eps_n * sum_g) / denom;
      if (lane == i - i0) {
        my_m = m;
        my_denom = denom;
        my_r = r;
        my_max_grad = policy_max_grad(sum_g_a, r, s, denom);
        my_argmax = arg;
      }
    }
    for (int64_t j0 = 0; j0 < N; j0 += kWarp) {
      const int64_t j = j0 + lane;
      const A Pj = j < N ? to_acc(P[j]) : A(0);
      A dp = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const int src = static_cast<int>(i - i0);
        const A m = __shfl_sync(0xffffffffu, my_m, src);
        const A denom = __shfl_sync(0xffffffffu, my_denom, src);
        const A r = __shfl_sync(0xffffffffu, my_r, src);
        const A max_grad = __shfl_sync(0xffffffffu, my_max_grad, src);
        const long long argmax = __shfl_sync(0xffffffffu, my_argmax, src);
        if (j < N) {
          const int64_t at = (bh * N + i) * N + j;
          const A e = acc_exp(to_acc(logits[at]) - m);
          const A ga = policy_grad_a(to_acc(grad[at]), r, denom);
          A dl = ga * e * policy_weight(Pj, j == i);
          if (j == argmax) dl -= max_grad;
          grad_logits[at] = from_acc<T>(dl);
          if (j != i) dp += ga * e;
        }
      }
      if (j < N) partial[task * N + j] = dp;
    }
  }
}

template <typename T>
__global__ void policy_reduce_kernel(PolicySoftmaxParams p) {
  using A = typename AccOf<T>::type;
  const A* partial = static_cast<const A*>(p.partial);
  T* grad_policy = static_cast<T*>(p.grad_policy);
  const int64_t chunks = (p.N + kPolicyRowsPerChunk - 1) / kPolicyRowsPerChunk;
  const int64_t per_b = p.H * chunks;
  for (int64_t t = global_thread(); t < p.B * p.N; t += thread_count()) {
    const int64_t b = t / p.N;
    const int64_t j = t - b * p.N;
    A s = 0;
    for (int64_t c = 0; c < per_b; ++c) s += partial[(b * per_b + c) * p.N + j];
    grad_policy[t] = from_acc<T>(s);
  }
}

}  // namespace

cudaError_t gather_rows_cuda(const GatherParams& p, cudaStream_t stream) {
  const int64_t elem = dtype_size(p.dtype);
  const uint64_t checks[] = {reinterpret_cast<uint64_t>(p.x), reinterpret_cast<uint64_t>(p.out),
                             static_cast<uint64_t>(p.x_stride_b * elem),
                             static_cast<uint64_t>(p.x_stride_n * elem),
                             static_cast<uint64_t>(p.C * elem)};
  dispatch_word(word_bytes(checks, 5), [&](auto word) {
    using Word = decltype(word);
    const int64_t words = p.C * elem / static_cast<int64_t>(sizeof(Word));
    const int64_t total = p.B * p.K * words;
    gather_rows_kernel<Word><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const char*>(p.x), p.x_stride_b * elem, p.x_stride_n * elem, p.index,
        static_cast<Word*>(p.out), p.N, p.K, words, total);
  });
  return cudaGetLastError();
}

cudaError_t build_inverse_cuda(const InverseParams& p, cudaStream_t stream) {
  build_inverse_kernel<<<blocks_for(p.B * p.K, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t compose_rows_cuda(const ComposeParams& p, cudaStream_t stream) {
  const int64_t elem = dtype_size(p.dtype);
  const uint64_t checks[] = {reinterpret_cast<uint64_t>(p.rows), reinterpret_cast<uint64_t>(p.self),
                             reinterpret_cast<uint64_t>(p.out),
                             static_cast<uint64_t>(p.self_stride_b * elem),
                             static_cast<uint64_t>(p.self_stride_n * elem),
                             static_cast<uint64_t>(p.C * elem)};
  const int bytes = word_bytes(checks, 6);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_word(bytes < static_cast<int>(sizeof(T)) ? static_cast<int>(sizeof(T)) : bytes,
                  [&](auto word) {
                    using Word = decltype(word);
                    const int64_t words = p.C * elem / static_cast<int64_t>(sizeof(Word));
                    const int64_t total = p.B * p.N * words;
                    compose_rows_kernel<T, Word>
                        <<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p, words, total);
                  });
  });
}

cudaError_t topk_index_cuda(const TopkParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    topk_index_kernel<T><<<blocks_for(p.B, 1), kThreads, 0, stream>>>(p);
  });
}

cudaError_t policy_softmax_forward_cuda(const PolicySoftmaxParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.N;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    policy_forward_kernel<T><<<blocks_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(p);
  });
}

cudaError_t policy_softmax_backward_cuda(const PolicySoftmaxParams& p, cudaStream_t stream) {
  const int64_t chunks = (p.N + kPolicyRowsPerChunk - 1) / kPolicyRowsPerChunk;
  const int64_t tasks = p.B * p.H * chunks;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    policy_backward_kernel<T><<<blocks_for(tasks, kThreads / kWarp), kThreads, 0, stream>>>(p);
    policy_reduce_kernel<T><<<blocks_for(p.B * p.N, kThreads), kThreads, 0, stream>>>(p);
  });
}

}  // namespace gather
}  // namespace tokenmix
