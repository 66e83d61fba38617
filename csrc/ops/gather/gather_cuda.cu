// CUDA kernels of the sparse-token gather family (DynamicViT). No torch headers: gather_cuda.cpp
// fills the params structs of gather_params.h.
//
// Launches per op: gather_tokens 1 (gather_rows); gather_tokens_backward and scatter_tokens 2
// (build_inverse, compose_rows); scatter_tokens_backward 3; topk_tokens 2 (topk_index,
// gather_rows); policy_softmax 1, its backward 2.
// Index values are checked here, on the device, so that no call waits for the device: an entry
// outside [0, N) (gather_rows, build_inverse) or a position listed twice in a scatter
// (compose_rows) stops the kernel with a device-side assertion (TM_DEVICE_CHECK) before any
// out-of-range address is formed. With TOKENMIX_CUDA_CHECK_INDICES=1 the launchers check on the
// host first and raise the CPU path's exact IndexError / ValueError (one synchronisation a call).
//
// Occupancy figures in the banners are for sm_90 (per SM: 65536 registers, 228 KB shared memory,
// 2048 threads, 32 blocks) with ptxas's register counts for sm_90. Grids are x = the work along a
// batch row, y and z = batch / head / word-chunk indices, each capped at its hardware limit with
// the kernel looping over the rest, so no kernel divides to find its batch row.

#include <climits>
#include <cstdint>
#include <cstring>

#include "gather_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace gather {
namespace {

using namespace cu;

constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridYZ = 65535;
// Positions of one batch row whose inverse map a block builds at a time (2 x 8 KB of shared
// memory), and candidates whose keys topk stages at a time (16 KB).
constexpr int kInverseTile = 2048;
constexpr int kTopkChunk = 2048;
// Rows of a policy_softmax backward tile whose loads are issued together.
constexpr int kPolicyBatch = 4;

unsigned grid_dim(int64_t n, int64_t limit) {
  return static_cast<unsigned>(n < 1 ? 1 : (n > limit ? limit : n));
}

dim3 row_grid(const RowTiling& g, int64_t B) {
  return dim3(grid_dim(g.tiles, kMaxGridX), grid_dim(B, kMaxGridYZ),
              grid_dim(g.chunks, kMaxGridYZ));
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

// Word w of R rows (k0, k0 + step, ...) of a gather: the R index loads, one check of all R, the
// R word loads, then the R stores, so R loads are in flight before the first use.
template <int R, typename Word>
__device__ __forceinline__ void gather_words(const Word* xw, int64_t sn, const int64_t* idx,
                                             Word* ow, int64_t N, int64_t k0, int64_t step,
                                             int64_t words) {
  int64_t n[R];
  TM_UNROLL
  for (int u = 0; u < R; ++u) n[u] = idx[k0 + u * step];
  bool ok = true;
  TM_UNROLL
  for (int u = 0; u < R; ++u) ok &= index_in_range(n[u], N);
  TM_DEVICE_CHECK(ok, "tokenmix: index entries must lie in [0, N)");
  Word v[R];
  TM_UNROLL
  for (int u = 0; u < R; ++u) {
    v[u] = *reinterpret_cast<const Word*>(reinterpret_cast<const char*>(xw) + n[u] * sn);
  }
  TM_UNROLL
  for (int u = 0; u < R; ++u) ow[(k0 + u * step) * words] = v[u];
}

// out[b, k, :] = x[b, index[b, k], :] in words of Word: 16 bytes where both base addresses, x's
// byte strides and the row size allow (row_word_bytes, checked per call on the host), else 8, 4,
// 2 or 1. Thread layout row_tiling (gather_math.h): one 32-bit division per thread, none in the
// loop; a full tile moves kRowsPerThread rows per thread with that many 16-byte loads in flight
// (gather_words), the last partial tile one row at a time.
// Occupancy: <= 256 threads x 48 registers (12288 a block) -> 5 blocks/SM by registers, 40 warps
// (62%); 40 x 32 x 4 x 16 B = 80 KB of loads in flight per SM, where ~18 KB cover DRAM latency
// (3.35 TB/s x ~700 ns / 132 SMs). No shared memory. Bound by memory: 2 x row bytes + 8 index
// bytes a row, no arithmetic. A DeiT-S row (C = 384, fp16) is 48 words: blocks of 5 x 48
// threads, 20 rows a block.
template <typename Word>
__global__ void gather_rows_kernel(const char* __restrict__ x, int64_t sb, int64_t sn,
                                   const int64_t* __restrict__ index, Word* __restrict__ out,
                                   int64_t B, int64_t N, int64_t K, int64_t words, RowTiling g) {
  const RowSlot s = row_slot(static_cast<int>(threadIdx.x), g.tx);
  const int64_t tile_rows = static_cast<int64_t>(g.ty) * kRowsPerThread;
  TM_NO_UNROLL
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    TM_NO_UNROLL
    for (int64_t c = blockIdx.z; c < g.chunks; c += gridDim.z) {
      const int64_t w = c * g.tx + s.word;
      if (w >= words) continue;
      const Word* xw = reinterpret_cast<const Word*>(x + b * sb) + w;
      Word* ow = out + b * K * words + w;
      TM_NO_UNROLL
      for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
        const int64_t k0 = tile * tile_rows + s.row;
        if (k0 + (kRowsPerThread - 1) * g.ty < K) {
          gather_words<kRowsPerThread>(xw, sn, index + b * K, ow, N, k0, g.ty, words);
        } else {
          TM_NO_UNROLL
          for (int64_t k = k0; k < K; k += g.ty) {
            gather_words<1>(xw, sn, index + b * K, ow, N, k, 0, words);
          }
        }
      }
    }
  }
}

// One word of the sum of rows k >= first of rows[b] with index[b, k] == n, in k order, in the
// accumulation type (gather backward with duplicate indices; the CPU path sums in the same order).
template <typename T, typename Word>
__device__ Word sum_word(const Word* rows_bw, const int64_t* idx_b, int64_t first, int64_t K,
                         int64_t n, int64_t words) {
  using A = typename AccOf<T>::type;
  constexpr int kElems = sizeof(Word) / sizeof(T);
  A acc[kElems];
  TM_UNROLL
  for (int e = 0; e < kElems; ++e) acc[e] = A(0);
  TM_NO_UNROLL
  for (int64_t k = first; k < K; ++k) {
    if (idx_b[k] != n) continue;
    const Word v = rows_bw[k * words];
    T t[kElems];
    memcpy(t, &v, sizeof(Word));
    TM_UNROLL
    for (int e = 0; e < kElems; ++e) acc[e] += to_acc(t[e]);
  }
  T t[kElems];
  TM_UNROLL
  for (int e = 0; e < kElems; ++e) t[e] = from_acc<T>(acc[e]);
  Word out;
  memcpy(&out, t, sizeof(Word));
  return out;
}

// Word w of R output rows (n0, n0 + step, ...) of compose: the R inverse-map entries, one
// uniqueness check (scatter), the R copy loads (self row, rows[first] or none), the R stores;
// Sum rows, rare, go one at a time afterwards.
template <typename T, int R, typename Word>
__device__ __forceinline__ void compose_words(const ComposeParams& p, int64_t b, int64_t n0,
                                              int64_t step, int64_t w, int64_t words) {
  const int64_t elem = sizeof(T);
  const int32_t* count = p.count + b * p.N;
  const int32_t* first = p.first + b * p.N;
  Word* ow = static_cast<Word*>(p.out) + b * p.N * words + w;
  int32_t cnt[R], fst[R];
  TM_UNROLL
  for (int u = 0; u < R; ++u) {
    cnt[u] = count[n0 + u * step];
    fst[u] = first[n0 + u * step];
  }
  bool unique = true;
  TM_UNROLL
  for (int u = 0; u < R; ++u) unique &= cnt[u] <= 1;
  TM_DEVICE_CHECK(p.mode != RowMode::Scatter || unique,
                  "tokenmix.scatter_tokens: index entries must be unique within each row");
  Word v[R];
  unsigned sums = 0;
  TM_UNROLL
  for (int u = 0; u < R; ++u) {
    const RowSource src = row_source(p.mode, cnt[u]);
    const Word* from = nullptr;
    if (src == RowSource::Self) {
      const int64_t at = (b * p.self_stride_b + (n0 + u * step) * p.self_stride_n) * elem;
      from = reinterpret_cast<const Word*>(static_cast<const char*>(p.self) + at) + w;
    } else if (src == RowSource::First) {
      from = static_cast<const Word*>(p.rows) + (b * p.K + fst[u]) * words + w;
    }
    sums |= src == RowSource::Sum ? 1u << u : 0u;
    v[u] = from != nullptr ? *from : Word{};
  }
  TM_UNROLL
  for (int u = 0; u < R; ++u) {
    if (!((sums >> u) & 1u)) ow[(n0 + u * step) * words] = v[u];
  }
  if (sums != 0) {
    TM_NO_UNROLL
    for (int u = 0; u < R; ++u) {
      if (!((sums >> u) & 1u)) continue;
      const int64_t n = n0 + u * step;
      ow[n * words] = sum_word<T>(static_cast<const Word*>(p.rows) + b * p.K * words + w,
                                  p.index + b * p.K, first[n], p.K, n, words);
    }
  }
}

// out [B, N, C] row by row as row_source(mode, count[b, n]) says, with the thread layout, word
// choice and full-tile / tail split of gather_rows_kernel (the rows operand [B, K, C] and self
// [B, N, C] share the word; a word holds whole elements). A duplicate position in a scatter is
// caught here, where the inverse map is read.
// Occupancy: <= 256 threads x 52 registers (allocated as 56: 14336 a block) -> 4 blocks/SM by
// registers, 32 warps (50%); 32 x 32 x 4 x 16 B = 64 KB of loads in flight per SM (~18 KB
// needed, see gather_rows). No shared memory. Bound by memory: at most 2 x row bytes + 8
// inverse-map bytes a row, no arithmetic outside the rare Sum rows.
template <typename T, typename Word>
__global__ void compose_rows_kernel(ComposeParams p, int64_t words, RowTiling g) {
  static_assert(sizeof(Word) >= sizeof(T), "a word holds whole elements");
  const RowSlot s = row_slot(static_cast<int>(threadIdx.x), g.tx);
  const int64_t tile_rows = static_cast<int64_t>(g.ty) * kRowsPerThread;
  TM_NO_UNROLL
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    TM_NO_UNROLL
    for (int64_t c = blockIdx.z; c < g.chunks; c += gridDim.z) {
      const int64_t w = c * g.tx + s.word;
      if (w >= words) continue;
      TM_NO_UNROLL
      for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
        const int64_t n0 = tile * tile_rows + s.row;
        if (n0 + (kRowsPerThread - 1) * g.ty < p.N) {
          compose_words<T, kRowsPerThread, Word>(p, b, n0, g.ty, w, words);
        } else {
          TM_NO_UNROLL
          for (int64_t n = n0; n < p.N; n += g.ty) {
            compose_words<T, 1, Word>(p, b, n, 0, w, words);
          }
        }
      }
    }
  }
}

// count/first (gather_math.h) of index [B, K] over N positions, built in shared memory a tile of
// kInverseTile positions at a time (block x of batch row y owns positions [x * tile, ...)): no
// fill kernels before it, no global atomics. Each block reads the whole index row and checks
// every entry. count and first are independent of the order of the atomics.
// Occupancy: 256 threads x 32 registers, 16 KB static shared memory (+1 KB reserved) -> 8
// blocks/SM by threads (8 x 17 KB = 136 KB of 228), 64 warps; B blocks for N <= 2048. Bound by
// latency: K index reads and K shared atomics per block, nothing to hide them behind (DeiT-S:
// 64 blocks x 137 entries); it replaces three launches (two fills and a global-atomic pass).
__global__ void build_inverse_kernel(InverseParams p) {
  __shared__ int32_t cnt[kInverseTile], fst[kInverseTile];
  constexpr int tile = kInverseTile;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const int64_t* idx = p.index + b * p.K;
    for (int64_t n0 = static_cast<int64_t>(blockIdx.x) * tile; n0 < p.N;
         n0 += static_cast<int64_t>(gridDim.x) * tile) {
      const int len = static_cast<int>(p.N - n0 < tile ? p.N - n0 : tile);
      for (int i = threadIdx.x; i < len; i += blockDim.x) {
        cnt[i] = 0;
        fst[i] = kNoEntry;
      }
      __syncthreads();
      for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
        const int64_t n = idx[k];
        TM_DEVICE_CHECK(index_in_range(n, p.N), "tokenmix: index entries must lie in [0, N)");
        const int64_t at = tile_offset(n, n0, len);
        if (at >= 0) {
          atomicAdd(cnt + at, 1);
          atomicMin(fst + at, static_cast<int32_t>(k));
        }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < len; i += blockDim.x) {
        p.count[b * p.N + n0 + i] = cnt[i];
        p.first[b * p.N + n0 + i] = fst[i];
      }
      __syncthreads();
    }
  }
}

// ---- topk -------------------------------------------------------------------------------------

// Block x of batch row y ranks candidates [256 x, 256 x + 256): the rank of a candidate is the
// number of candidates ordered before it (ranks_before), counted against keys staged in shared
// memory kTopkChunk at a time (count_before, gather_math.h), so each score is read from global
// memory once per block instead of once per pair. Ranks below k give the output slot. O(M^2)
// compares per row: meant for token counts of a few thousand at most.
// Occupancy: 256 threads x 32 registers, 16 KB static shared memory (+1 KB reserved) -> 8
// blocks/SM by threads (8 x 17 KB = 136 KB of 228), 64 warps. Bound by latency at DeiT-S sizes
// (B blocks of M = 196 candidates, 196 broadcast shared-memory compares each, 16 a 128-bit
// load); by the compare loop (2 integer ops a pair) for M in the thousands.
template <typename T>
__global__ void topk_index_kernel(TopkParams p) {
  __shared__ uint64_t keys[kTopkChunk];
  const T* score = static_cast<const T*>(p.score);
  const int64_t L = p.keep_first + p.k;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const T* s = score + b * p.score_stride_b;
    int64_t* out = p.index + b * L;
    if (blockIdx.x == 0) {
      for (int64_t t = threadIdx.x; t < p.keep_first; t += blockDim.x) out[t] = t;
    }
    for (int64_t pos0 = static_cast<int64_t>(blockIdx.x) * blockDim.x; pos0 < p.M;
         pos0 += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t pos = pos0 + threadIdx.x;
      const bool mine = pos < p.M;
      const uint64_t key = mine ? rank_key(to_acc(s[pos])) : 0;
      int64_t rank = 0;
      for (int64_t q0 = 0; q0 < p.M; q0 += kTopkChunk) {
        const int len = static_cast<int>(p.M - q0 < kTopkChunk ? p.M - q0 : kTopkChunk);
        __syncthreads();
        for (int q = threadIdx.x; q < len; q += blockDim.x) {
          keys[q] = rank_key(to_acc(s[q0 + q]));
        }
        __syncthreads();
        if (mine && rank < p.k) rank += count_before(keys, q0, len, key, pos);
      }
      if (mine && rank < p.k) out[p.keep_first + rank] = p.keep_first + pos;
    }
  }
}

// ---- policy_softmax ---------------------------------------------------------------------------

// One warp per attention row (b, h, i): max, weighted sum, then the normalised row; the row is
// read three times (the second and third from L1/L2: N = 197 fp16 is 394 bytes).
// Occupancy: 256 threads x 40 registers (10240 a block) -> 6 blocks/SM by registers, 48 warps
// (75%); fp64 68 registers (allocated as 72) -> 3 blocks, 24 warps. Bound by memory: 2 x N
// elements moved per row against ~10 N flops and 2 N exps (the exp is recomputed, not kept).
template <typename T>
__global__ void policy_forward_kernel(PolicySoftmaxParams p) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(p.logits);
  const T* policy = static_cast<const T*>(p.policy);
  T* out = static_cast<T*>(p.out);
  const int lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const A eps = static_cast<A>(p.eps);
  const A eps_n = eps / static_cast<A>(p.N);
  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    const T* P = policy + b * p.N;
    for (int64_t h = blockIdx.y; h < p.H; h += gridDim.y) {
      for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp; i < p.N;
           i += static_cast<int64_t>(gridDim.x) * warps) {
        const int64_t row = (b * p.H + h) * p.N + i;
        const T* l = logits + row * p.N;
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
  }
}

// One block per tile of kPolicyRowsPerChunk rows of a (b, h) slice. The row statistics (max,
// denominator, r, the max-gradient term, argmax) are reduced one row per warp, 8 rows in
// parallel, and staged in shared memory; then each thread owns a column j and walks the tile's
// rows in ascending order (kPolicyBatch rows' loads issued together), writing grad_logits and
// summing its policy partial in that order: fixed, whatever the grid, so results are
// deterministic (and bitwise those of the one-warp-per-tile kernel this replaces).
// Occupancy: 256 threads x 48 registers (12288 a block), 0.8 KB shared memory -> 5 blocks/SM by
// registers, 40 warps (62%); fp64 76 registers (allocated as 80) -> 3 blocks, 24 warps. DeiT-S,
// B = 64: 64 x 6 x 7 = 2688 blocks, ~4 waves of 660 on 132 SMs. Bound by memory: logits read
// twice and grad twice (the second time from L1/L2: a tile is 32 x 394 bytes a tensor in
// fp16), grad_logits written once, ~15 flops and 2 exps per element.
template <typename T>
__global__ void policy_backward_kernel(PolicySoftmaxParams p) {
  using A = typename AccOf<T>::type;
  __shared__ A st_m[kPolicyRowsPerChunk], st_denom[kPolicyRowsPerChunk], st_r[kPolicyRowsPerChunk],
      st_max_grad[kPolicyRowsPerChunk];
  __shared__ long long st_arg[kPolicyRowsPerChunk];
  const T* logits = static_cast<const T*>(p.logits);
  const T* policy = static_cast<const T*>(p.policy);
  const T* grad = static_cast<const T*>(p.grad_out);
  T* grad_logits = static_cast<T*>(p.out);
  A* partial = static_cast<A*>(p.partial);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t N = p.N;
  const int64_t chunks = policy_chunks(N);
  const A eps = static_cast<A>(p.eps);
  const A eps_n = eps / static_cast<A>(N);
  TM_NO_UNROLL
  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    const T* P = policy + b * N;
    TM_NO_UNROLL
    for (int64_t h = blockIdx.y; h < p.H; h += gridDim.y) {
      const int64_t bh = b * p.H + h;
      TM_NO_UNROLL
      for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
        const PolicyTile tile = policy_tile(chunk, N);
        const int64_t i0 = tile.i0;
        const int rows = tile.rows;
        for (int ii = warp; ii < rows; ii += warps) {
          const int64_t i = i0 + ii;
          const T* l = logits + policy_elem_at(bh, N, i, 0);
          const T* g = grad + policy_elem_at(bh, N, i, 0);
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
          if (lane == 0) {
            const A denom = s + eps;
            const A r = (sum_g_a + eps_n * sum_g) / denom;
            st_m[ii] = m;
            st_denom[ii] = denom;
            st_r[ii] = r;
            st_max_grad[ii] = policy_max_grad(sum_g_a, r, s, denom);
            st_arg[ii] = arg;
          }
        }
        __syncthreads();
        for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
          const A Pj = to_acc(P[j]);
          A dp = 0;
          for (int ii0 = 0; ii0 < rows; ii0 += kPolicyBatch) {
            A lv[kPolicyBatch], gv[kPolicyBatch];
            TM_UNROLL
            for (int q = 0; q < kPolicyBatch; ++q) {
              const int64_t at = policy_elem_at(bh, N, i0 + ii0 + q, j);
              lv[q] = ii0 + q < rows ? to_acc(logits[at]) : A(0);
              gv[q] = ii0 + q < rows ? to_acc(grad[at]) : A(0);
            }
            TM_UNROLL
            for (int q = 0; q < kPolicyBatch; ++q) {
              const int ii = ii0 + q;
              if (ii >= rows) continue;
              const int64_t i = i0 + ii;
              const A e = acc_exp(lv[q] - st_m[ii]);
              const A ga = policy_grad_a(gv[q], st_r[ii], st_denom[ii]);
              A dl = ga * e * policy_weight(Pj, j == i);
              if (j == st_arg[ii]) dl -= st_max_grad[ii];
              grad_logits[policy_elem_at(bh, N, i, j)] = from_acc<T>(dl);
              if (j != i) dp += ga * e;
            }
          }
          partial[policy_partial_at(bh, chunks, chunk, N, j)] = dp;
        }
        __syncthreads();
      }
    }
  }
}

// grad_policy[b, j] = the sum over (h, chunk) of the partials, in that fixed order.
// Occupancy: 256 threads x 28 registers (32 fp64) -> 8 blocks/SM by threads, 64 warps. Bound by
// memory (H x chunks partials read per output, coalesced along j, 4 loads in flight a thread);
// B x ceil(N / 256) blocks: latency-bound at DeiT-S sizes (64 x 42 x 197 floats, 2 MB).
template <typename T>
__global__ void policy_reduce_kernel(PolicySoftmaxParams p) {
  using A = typename AccOf<T>::type;
  const A* partial = static_cast<const A*>(p.partial);
  T* grad_policy = static_cast<T*>(p.grad_policy);
  const int64_t per_b = p.H * policy_chunks(p.N);
  TM_NO_UNROLL
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    TM_NO_UNROLL
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.N;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A* src = partial + b * per_b * p.N + j;
      A s = 0;
#pragma unroll 4
      for (int64_t c = 0; c < per_b; ++c) s += src[c * p.N];
      grad_policy[b * p.N + j] = from_acc<T>(s);
    }
  }
}

}  // namespace

cudaError_t gather_rows_cuda(const GatherParams& p, cudaStream_t stream) {
  const int64_t elem = dtype_size(p.dtype);
  const uint64_t checks[] = {reinterpret_cast<uint64_t>(p.x), reinterpret_cast<uint64_t>(p.out),
                             static_cast<uint64_t>(p.x_stride_b * elem),
                             static_cast<uint64_t>(p.x_stride_n * elem),
                             static_cast<uint64_t>(p.C * elem)};
  dispatch_word(row_word_bytes(checks, 5), [&](auto word) {
    using Word = decltype(word);
    const int64_t words = p.C * elem / static_cast<int64_t>(sizeof(Word));
    const RowTiling g = row_tiling(p.K, words, kThreads);
    gather_rows_kernel<Word><<<row_grid(g, p.B), g.tx * g.ty, 0, stream>>>(
        static_cast<const char*>(p.x), p.x_stride_b * elem, p.x_stride_n * elem, p.index,
        static_cast<Word*>(p.out), p.B, p.N, p.K, words, g);
  });
  return cudaGetLastError();
}

cudaError_t build_inverse_cuda(const InverseParams& p, cudaStream_t stream) {
  const dim3 grid(grid_dim((p.N + kInverseTile - 1) / kInverseTile, kMaxGridX),
                  grid_dim(p.B, kMaxGridYZ));
  build_inverse_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t compose_rows_cuda(const ComposeParams& p, cudaStream_t stream) {
  const int64_t elem = dtype_size(p.dtype);
  const uint64_t checks[] = {reinterpret_cast<uint64_t>(p.rows), reinterpret_cast<uint64_t>(p.self),
                             reinterpret_cast<uint64_t>(p.out),
                             static_cast<uint64_t>(p.self_stride_b * elem),
                             static_cast<uint64_t>(p.self_stride_n * elem),
                             static_cast<uint64_t>(p.C * elem)};
  const int bytes = row_word_bytes(checks, 6);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_word(bytes < static_cast<int>(sizeof(T)) ? static_cast<int>(sizeof(T)) : bytes,
                  [&](auto word) {
                    using Word = decltype(word);
                    if constexpr (sizeof(Word) >= sizeof(T)) {
                      const int64_t words = p.C * elem / static_cast<int64_t>(sizeof(Word));
                      const RowTiling g = row_tiling(p.N, words, kThreads);
                      compose_rows_kernel<T, Word>
                          <<<row_grid(g, p.B), g.tx * g.ty, 0, stream>>>(p, words, g);
                    }
                  });
  });
}

cudaError_t topk_index_cuda(const TopkParams& p, cudaStream_t stream) {
  const dim3 grid(grid_dim((p.M + kThreads - 1) / kThreads, kMaxGridX), grid_dim(p.B, kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    topk_index_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  });
}

cudaError_t policy_softmax_forward_cuda(const PolicySoftmaxParams& p, cudaStream_t stream) {
  const int64_t warps = kThreads / kWarp;
  const dim3 grid(grid_dim((p.N + warps - 1) / warps, kMaxGridX), grid_dim(p.H, kMaxGridYZ),
                  grid_dim(p.B, kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    policy_forward_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  });
}

cudaError_t policy_softmax_backward_cuda(const PolicySoftmaxParams& p, cudaStream_t stream) {
  const dim3 grid(grid_dim(policy_chunks(p.N), kMaxGridX), grid_dim(p.H, kMaxGridYZ),
                  grid_dim(p.B, kMaxGridYZ));
  const dim3 reduce(grid_dim((p.N + kThreads - 1) / kThreads, kMaxGridX),
                    grid_dim(p.B, kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    policy_backward_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    policy_reduce_kernel<T><<<reduce, kThreads, 0, stream>>>(p);
  });
}

}  // namespace gather
}  // namespace tokenmix
