// CUDA kernels of windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net local).
//
// One block of 4 warps per (image, window, head). The window's Q (pre-scaled), K, V (and dO in
// backward) are loaded from their original map positions (window_math.h: shift, partial border
// windows) into shared memory in the accumulation type, rows padded to d + 1 so that lanes reading
// different tokens hit different banks. A window is small (<= 256 tokens, head_dim <= 128): each
// lane keeps up to 8 scores of a query row in registers, the whole row's softmax is two warp
// reductions, and nothing of size T x T reaches global memory.
//
// Forward: a warp per query row: scores + bias + region mask, softmax, P V; saves the row's
//   log-sum-exp. fp16/bf16 with head_dim 32 and windows of <= 64 tokens take forward_tc_kernel
//   and backward_tc_kernel instead (tensor cores; see their banners).
// Backward: phase 1, a warp per query row: P from the saved log-sum-exp, dP = dO V^T,
//   D = rowsum(P * dP), dS = P (dP - D), dQ = scale dS K, bias gradient into a per-warp table;
//   phase 2, a warp per key row: P and dS of its column recomputed, dV = P^T dO, dK = dS^T Qs.
//   The per-warp bias tables are summed in warp order per block, the per-block partials in two
//   fixed-order levels (chunks of 64 blocks, then the chunks) and the global query's per-window dQ
//   in window order, by separate kernels: deterministic.
// Index math inside a window is 32-bit, and a pair's bias-table row is the difference of two
// per-token terms kept in shared memory (relative_pos): the 64-bit divisions of relative_index,
// four per score, cost more than the score's 32-term dot product. head_dim 32 (every Swin and
// GC ViT variant) is a compile-time constant, so the dot products and channel loops unroll, and
// windows of up to 64 tokens keep 2 scores per lane instead of 8.
// Limits: tokens per window <= 256, head_dim <= 128, shared memory within the device's opt-in
// limit (checked by the launcher with window_attention_smem_bytes).

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "tokenmix/cuda_common.cuh"
#include "window_attention_params.h"

namespace tokenmix {
namespace window {
namespace {

using namespace cu;

constexpr int kWarps = 4;
constexpr int kBlock = kWarps * kWarp;
constexpr int kKeysPerLane = kMaxWindowTokens / kWarp;
constexpr int kChansPerLane = kMaxHeadDim / kWarp;

int64_t acc_bytes(DType t) {
  return t == DType::Float64 ? 8 : 4;
}

// Shared-memory layout of one block (accumulation-type arrays first, then int arrays).
template <typename A>
struct Smem {
  A *Qs, *Ks, *Vs, *dOs;  // [T, d + 1]
  A *D, *lse;             // [T] (backward)
  A *rowP, *rowS;         // [kWarps, T]
  A* tables;              // [kWarps, table] (backward)
  int *ty, *tx, *treg;    // original row/col, Swin region (-1: outside the map)
  int* tpos;              // relative_pos of each token (window_math.h)

  __device__ Smem(unsigned char* raw, int T, int ld, int table, bool backward) {
    A* a = reinterpret_cast<A*>(raw);
    Qs = a;
    Ks = Qs + T * ld;
    Vs = Ks + T * ld;
    rowP = Vs + T * ld;
    rowS = rowP + kWarps * T;
    a = rowS + kWarps * T;
    if (backward) {
      dOs = a;
      D = dOs + T * ld;
      lse = D + T;
      tables = lse + T;
      a = tables + kWarps * table;
    } else {
      dOs = D = lse = tables = nullptr;
    }
    ty = reinterpret_cast<int*>(a);
    tx = ty + T;
    treg = tx + T;
    tpos = treg + T;
  }
};

// Window-local sizes fit in int (tokens <= 256, head_dim <= 128): 32-bit index math in the inner
// loops, 64-bit only where global offsets are formed.
struct Local {
  int T, d, ld, table, rel0;
  __device__ explicit Local(const WindowParams& p)
      : T(static_cast<int>(p.geo.tokens())), d(static_cast<int>(p.d)), ld(static_cast<int>(p.d) + 1),
        table(static_cast<int>(p.geo.table_size())), rel0(relative_offset(p.geo)) {}
};

__device__ __forceinline__ int64_t map_offset(const WindowParams& p, int64_t b, int64_t y,
                                              int64_t x, int64_t h) {
  return (((b * p.geo.H + y) * p.geo.W + x) * p.heads + h) * p.d;
}

__device__ __forceinline__ int64_t strided(const Strides4& s, int64_t b, int64_t y, int64_t x,
                                           int64_t h) {
  return b * s.b + y * s.y + x * s.x + h * s.h;
}

// Token t of window `win`: its original row and column, Swin region (-1 outside the map) and
// relative position, into the shared arrays; returns whether it lies inside the map.
__device__ __forceinline__ bool place_token(const Geometry& g, int64_t win, int t, int* ty, int* tx,
                                            int* treg, int* tpos) {
  int64_t sy = 0, sx = 0;
  const bool exists = shifted_coords(g, win, t, &sy, &sx);
  ty[t] = exists ? static_cast<int>(original_row(g, sy)) : 0;
  tx[t] = exists ? static_cast<int>(original_col(g, sx)) : 0;
  treg[t] = exists ? region(g, sy, sx) : -1;
  tpos[t] = relative_pos(g, t);
  return exists;
}

// Window tokens' coordinates, then Q (scaled), K, V and optionally dO, into shared memory.
template <typename T, typename A>
__device__ void load_window(const WindowParams& p, const Local& l, int64_t b, int64_t win, int64_t h,
                            Smem<A>& s) {
  const Geometry& g = p.geo;
  const int Tn = l.T, d = l.d, ld = l.ld;
  for (int t = threadIdx.x; t < Tn; t += blockDim.x) place_token(g, win, t, s.ty, s.tx, s.treg, s.tpos);
  __syncthreads();
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  const A scale = static_cast<A>(p.scale);
  for (int e = threadIdx.x; e < Tn * d; e += blockDim.x) {
    const int t = e / d, c = e - t * d;
    const bool exists = s.treg[t] >= 0;
    const int64_t y = s.ty[t], x = s.tx[t];
    A qv = 0, kv = 0, vv = 0, gv = 0;
    if (p.global_q) {
      qv = to_acc(q[strided(p.q_strides, b, t / g.ww, t % g.ww, h) + c]) * scale;
    }
    if (exists) {
      if (!p.global_q) qv = to_acc(q[strided(p.q_strides, b, y, x, h) + c]) * scale;
      kv = to_acc(k[strided(p.k_strides, b, y, x, h) + c]);
      vv = to_acc(v[strided(p.v_strides, b, y, x, h) + c]);
      if (s.dOs != nullptr) gv = to_acc(grad[map_offset(p, b, y, x, h) + c]);
    }
    s.Qs[t * ld + c] = qv;
    s.Ks[t * ld + c] = kv;
    s.Vs[t * ld + c] = vv;
    if (s.dOs != nullptr) s.dOs[t * ld + c] = gv;
  }
}

// sum_c a[c] b[c] over the head dim: D when known at compile time (unrolled), else d.
template <typename A, int D>
__device__ __forceinline__ A dot_rows(const A* a, const A* b, int d) {
  A acc = 0;
  if constexpr (D > 0) {
#pragma unroll
    for (int c = 0; c < D; ++c) acc += a[c] * b[c];
  } else {
    for (int c = 0; c < d; ++c) acc += a[c] * b[c];
  }
  return acc;
}

// Score of query i and key j (scaled dot product + bias); -inf when j is masked for i.
template <typename T, typename A, int D>
__device__ __forceinline__ A score(const WindowParams& p, const Local& l, const Smem<A>& s, int64_t h,
                                   int i, int j) {
  if (s.treg[j] != s.treg[i]) return neg_inf<A>();
  A acc = dot_rows<A, D>(s.Qs + i * l.ld, s.Ks + j * l.ld, l.d);
  if (p.bias_table != nullptr) {
    const int rel = s.tpos[i] - s.tpos[j] + l.rel0;
    acc += to_acc(static_cast<const T*>(p.bias_table)[rel * p.heads + h]);
  }
  return acc;
}

// Channels per lane that can hold a head-dim channel: all kChansPerLane unless D says fewer.
template <int D>
constexpr int kLaneChans = D > 0 ? (D + kWarp - 1) / kWarp : static_cast<int>(kChansPerLane);

// out[u] = sum_j w[j] * M[j * ld + c] for the lane's channels c = lane + 32 u.
template <typename A, int D>
__device__ __forceinline__ void weighted_rows(const A* w, const A* M, const Local& l, int lane,
                                              A (&out)[kChansPerLane]) {
#pragma unroll
  for (int u = 0; u < kChansPerLane; ++u) out[u] = 0;
  for (int j = 0; j < l.T; ++j) {
    const A wj = w[j];
#pragma unroll
    for (int u = 0; u < kLaneChans<D>; ++u) {
      const int c = lane + kWarp * u;
      if (c < l.d) out[u] += wj * M[j * l.ld + c];
    }
  }
}

template <typename T, int D, int KEYS>
__global__ void __launch_bounds__(kBlock) forward_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Local l(p);
  const int Tn = l.T;
  const int64_t nW = p.geo.windows();
  Smem<A> s(smem_raw, Tn, l.ld, l.table, false);
  const int64_t task = blockIdx.x;  // (b * nW + win) * heads + h
  const int64_t h = task % p.heads, win = (task / p.heads) % nW, b = task / (p.heads * nW);
  load_window<T, A>(p, l, b, win, h, s);
  __syncthreads();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  A* row = s.rowP + warp * Tn;
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);
  for (int i = warp; i < Tn; i += kWarps) {
    if (s.treg[i] < 0) continue;
    A sc[KEYS];
    A m = neg_inf<A>();
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int j = lane + kWarp * u;
      sc[u] = j < Tn ? score<T, A, D>(p, l, s, h, i, j) : neg_inf<A>();
      m = max_nan(m, sc[u]);
    }
    m = warp_max(m);
    A sum = 0;
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      sc[u] = acc_exp(sc[u] - m);
      sum += sc[u];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int j = lane + kWarp * u;
      if (j < Tn) row[j] = sc[u] / sum;
    }
    __syncwarp();
    A o[kChansPerLane];
    weighted_rows<A, D>(row, s.Vs, l, lane, o);
    const int64_t base = map_offset(p, b, s.ty[i], s.tx[i], h);
#pragma unroll
    for (int u = 0; u < kLaneChans<D>; ++u) {
      const int c = lane + kWarp * u;
      if (c < l.d) out[base + c] = from_acc<T>(o[u]);
    }
    if (lane == 0 && lse != nullptr) lse[((b * nW + win) * Tn + i) * p.heads + h] = m + acc_log(sum);
    __syncwarp();
  }
}

// Tensor-core forward for what Swin and GC ViT run: fp16/bf16, head_dim 32, windows of at most
// 64 tokens (padded to 64). WMMA 16x16x16 with fp32 accumulation; warp w owns query rows
// [16 w, 16 w + 16): S = Q K^T for its rows, then per row the scale, bias, region mask and softmax
// in fp32 (scores and the log-sum-exp as the SIMT kernels compute them, up to summation order),
// P rounded to the input dtype as eager attention does, O = P V, written from shared memory with
// a lane per channel. Padding tokens and tokens outside the map are zero rows of Q, K and V and
// masked keys. Limits: sm_80+ (bf16 fragments); about 43 KB of static shared memory per block.
namespace tc {
constexpr int kT = 64, kD = 32;
constexpr int kLdQ = kD + 8;   // Qs, Ks, Vs: [kT][kLdQ] in the input dtype
constexpr int kLdS = kT + 4;   // S (then O): [kT][kLdS] fp32
constexpr int kLdP = kT + 8;   // P: [kT][kLdP] in the input dtype
constexpr int kRegionPad = -2;  // treg of padding rows: never equal to a real region or to -1

// A window as the tensor-core kernels hold it in shared memory: tokens padded to kT, rows of the
// input dtype kLdQ apart; dO and the saved log-sum-exp only in backward (else null).
template <typename T>
struct Window {
  T *Qs, *Ks, *Vs, *dOs;
  float* lse;
  int *ty, *tx, *treg, *tpos;
};

// Fills w for window `win` of image b, head h: coordinates, region (-1 outside the map,
// kRegionPad for padding), relative positions, then Q (unscaled), K, V (, dO, lse); zeros where a
// token has no value. Ends with a block barrier.
template <typename T>
__device__ void load_window(const WindowParams& p, const Local& l, int64_t b, int64_t win, int64_t h,
                            const Window<T>& w) {
  const Geometry& g = p.geo;
  const int64_t nW = g.windows();
  for (int t = threadIdx.x; t < kT; t += blockDim.x) {
    bool exists = false;
    if (t < l.T) {
      exists = place_token(g, win, t, w.ty, w.tx, w.treg, w.tpos);
    } else {
      w.ty[t] = w.tx[t] = w.tpos[t] = 0;
      w.treg[t] = kRegionPad;
    }
    if (w.lse != nullptr) {
      w.lse[t] = exists ? static_cast<const float*>(p.lse)[((b * nW + win) * l.T + t) * p.heads + h] : 0.0f;
    }
  }
  __syncthreads();
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  const T zero = from_acc<T>(0.0f);
  for (int e = threadIdx.x; e < kT * kD; e += blockDim.x) {
    const int t = e / kD, c = e % kD;
    const bool exists = w.treg[t] >= 0;
    T qv = zero, kv = zero, vv = zero, gv = zero;
    if (p.global_q && t < l.T) qv = q[strided(p.q_strides, b, t / g.ww, t % g.ww, h) + c];
    if (exists) {
      const int y = w.ty[t], x = w.tx[t];
      if (!p.global_q) qv = q[strided(p.q_strides, b, y, x, h) + c];
      kv = k[strided(p.k_strides, b, y, x, h) + c];
      vv = v[strided(p.v_strides, b, y, x, h) + c];
      if (w.dOs != nullptr) gv = grad[map_offset(p, b, y, x, h) + c];
    }
    w.Qs[t * kLdQ + c] = qv;
    w.Ks[t * kLdQ + c] = kv;
    w.Vs[t * kLdQ + c] = vv;
    if (w.dOs != nullptr) w.dOs[t * kLdQ + c] = gv;
  }
  __syncthreads();
}

// S rows [r0, r0 + 16), columns [0, kN) = A B over kK, for rows r0.. of the row-major A (lda
// apart) and B read with layout BLayout: the fragment for k-slice kf and column block n starts
// at B + kf * k_stride + 16 n * n_stride.
template <typename T, typename BLayout, int kN, int kK>
__device__ void rows_product(const T* A, int lda, const T* B, int ldb, int k_stride, int n_stride,
                             float* S, int r0) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kN / 16];
#pragma unroll
  for (int n = 0; n < kN / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kf = 0; kf < kK; kf += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::load_matrix_sync(a, A + r0 * lda + kf, lda);
#pragma unroll
    for (int n = 0; n < kN / 16; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> bf;
      wmma::load_matrix_sync(bf, B + kf * k_stride + 16 * n * n_stride, ldb);
      wmma::mma_sync(acc[n], a, bf, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kN / 16; ++n) {
    wmma::store_matrix_sync(S + r0 * kLdS + 16 * n, acc[n], kLdS, wmma::mem_row_major);
  }
}

// X Y^T over the head dim for the warp's rows of X and every row of Y (both [kT][kLdQ]; Y's rows
// are B read column-major): scores, or dP = dO V^T.
template <typename T>
__device__ void rows_by_rows(const T* X, const T* Y, float* S, int r0) {
  rows_product<T, nvcuda::wmma::col_major, kT, kD>(X, kLdQ, Y, kLdQ, 1, kLdQ, S, r0);
}

// A M over the tokens for the warp's rows of A ([kT][kLdP]) and M ([kT][kLdQ], row-major):
// O = P V in forward, dS K in backward.
template <typename T>
__device__ void rows_by_tokens(const T* A, const T* M, float* S, int r0) {
  rows_product<T, nvcuda::wmma::row_major, kD, kT>(A, kLdP, M, kLdQ, kLdQ, 1, S, r0);
}
}  // namespace tc

template <typename T>
__global__ void __launch_bounds__(kBlock) forward_tc_kernel(WindowParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace tc;
  __shared__ __align__(128) T Qs[kT * kLdQ];
  __shared__ __align__(128) T Ks[kT * kLdQ];
  __shared__ __align__(128) T Vs[kT * kLdQ];
  __shared__ __align__(128) float S[kT * kLdS];
  __shared__ __align__(128) T Ps[kT * kLdP];
  __shared__ int ty[kT], tx[kT], treg[kT], tpos[kT];

  const Geometry& g = p.geo;
  const Local l(p);
  const int Tn = l.T;
  const int64_t nW = g.windows();
  const int64_t task = blockIdx.x;  // (b * nW + win) * heads + h
  const int64_t h = task % p.heads, win = (task / p.heads) % nW, b = task / (p.heads * nW);
  load_window<T>(p, l, b, win, h, Window<T>{Qs, Ks, Vs, nullptr, nullptr, ty, tx, treg, tpos});

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, r0 = 16 * warp;
  rows_by_rows(Qs, Ks, S, r0);
  __syncwarp();

  const float scale = static_cast<float>(p.scale);
  const T* table = static_cast<const T*>(p.bias_table);
  float* lse = static_cast<float*>(p.lse);
  for (int i = r0; i < r0 + 16; ++i) {
    float sc[kT / kWarp];
    float m = neg_inf<float>();
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      const int j = lane + kWarp * u;
      sc[u] = neg_inf<float>();
      if (treg[i] >= 0 && treg[j] == treg[i]) {
        sc[u] = S[i * kLdS + j] * scale;
        if (table != nullptr) sc[u] += to_acc(table[(tpos[i] - tpos[j] + l.rel0) * p.heads + h]);
      }
      m = max_nan(m, sc[u]);
    }
    m = warp_max(m);
    float sum = 0;
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      sc[u] = treg[i] >= 0 ? acc_exp(sc[u] - m) : 0.0f;
      sum += sc[u];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      Ps[i * kLdP + lane + kWarp * u] = from_acc<T>(treg[i] >= 0 ? sc[u] / sum : 0.0f);
    }
    if (lane == 0 && lse != nullptr && treg[i] >= 0) {
      lse[((b * nW + win) * Tn + i) * p.heads + h] = m + acc_log(sum);
    }
  }
  __syncwarp();
  rows_by_tokens(Ps, Vs, S, r0);  // O = P V into the warp's own rows of S, free again
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  for (int i = r0; i < r0 + 16; ++i) {
    if (treg[i] < 0) continue;
    out[map_offset(p, b, ty[i], tx[i], h) + lane] = from_acc<T>(S[i * kLdS + lane]);
  }
#else
  __trap();  // window_attention_forward_cuda selects this kernel only on sm_80+
#endif
}

// Tensor-core backward for the forward_tc_kernel cases. Phase 1, warp w on query rows
// [16 w, 16 w + 16): S = Q K^T, P from the saved log-sum-exp (fp32, kept in registers; P also
// rounded into shared memory for phase 2), dP = dO V^T, D = rowsum(P dP), dS = P (dP - D) (into
// shared memory and the warp's bias table), dQ = scale dS K. Phase 2, warp w on key rows
// [16 w, 16 w + 16): dV = P^T dO and dK = scale dS^T Q, read column-major out of the row-major P
// and dS. The bias table and the global query's dQ go through the same deterministic reductions
// as the SIMT backward. Limits as forward_tc_kernel; about 60 KB of dynamic shared memory.
namespace tc {
// Shared-memory carve-up of backward_tc_kernel: arrays in this order, each starting on a 128-byte
// boundary (WMMA needs 32-byte aligned tiles).
struct BwdSmem {
  static constexpr int kQKV = kT * kLdQ;  // elements of each of Qs, Ks, Vs, dOs
  __host__ __device__ static int64_t round(int64_t bytes) { return (bytes + 127) / 128 * 128; }
  template <typename T>
  static int64_t bytes(int table) {
    return 4 * round(kQKV * sizeof(T)) + round(kT * kLdS * 4) + 2 * round(kT * kLdP * sizeof(T)) +
           round(kT * 4) + round(int64_t{kWarps} * table * 4) + 4 * round(kT * sizeof(int));
  }
};
}  // namespace tc

template <typename T>
__global__ void __launch_bounds__(kBlock) backward_tc_kernel(WindowParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace tc;
  // The only shared memory of this kernel, so it starts at the block's (aligned) window.
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const Geometry& g = p.geo;
  const Local l(p);
  const int Tn = l.T, table = l.table;
  // Carve-up, each array starting on a 128-byte boundary for WMMA's 32-byte alignment.
  unsigned char* cur = smem_tc;
  const auto take = [&cur](int64_t bytes) {
    unsigned char* at = cur;
    cur += BwdSmem::round(bytes);
    return at;
  };
  T* Qs = reinterpret_cast<T*>(take(BwdSmem::kQKV * sizeof(T)));
  T* Ks = reinterpret_cast<T*>(take(BwdSmem::kQKV * sizeof(T)));
  T* Vs = reinterpret_cast<T*>(take(BwdSmem::kQKV * sizeof(T)));
  T* dOs = reinterpret_cast<T*>(take(BwdSmem::kQKV * sizeof(T)));
  float* S = reinterpret_cast<float*>(take(kT * kLdS * 4));
  T* Pm = reinterpret_cast<T*>(take(kT * kLdP * sizeof(T)));
  T* dSm = reinterpret_cast<T*>(take(kT * kLdP * sizeof(T)));
  float* lse_s = reinterpret_cast<float*>(take(kT * 4));
  float* tables = reinterpret_cast<float*>(take(kWarps * table * 4));
  int* ty = reinterpret_cast<int*>(take(kT * sizeof(int)));
  int* tx = reinterpret_cast<int*>(take(kT * sizeof(int)));
  int* treg = reinterpret_cast<int*>(take(kT * sizeof(int)));
  int* tpos = reinterpret_cast<int*>(take(kT * sizeof(int)));

  const int64_t nW = g.windows();
  const int64_t task = blockIdx.x;  // (b * nW + win) * heads + h
  const int64_t h = task % p.heads, win = (task / p.heads) % nW, b = task / (p.heads * nW);
  for (int e = threadIdx.x; e < kWarps * table; e += blockDim.x) tables[e] = 0;
  load_window<T>(p, l, b, win, h, Window<T>{Qs, Ks, Vs, dOs, lse_s, ty, tx, treg, tpos});

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, r0 = 16 * warp;
  const float scale = static_cast<float>(p.scale);
  const T* bias = static_cast<const T*>(p.bias_table);
  float* tab = tables + warp * table;

  // Phase 1: P from the scores, kept in fp32 registers for dS.
  rows_by_rows(Qs, Ks, S, r0);
  __syncwarp();
  float pr[16][kT / kWarp];
#pragma unroll
  for (int ii = 0; ii < 16; ++ii) {
    const int i = r0 + ii;
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      const int j = lane + kWarp * u;
      float pij = 0.0f;
      if (treg[i] >= 0 && treg[j] == treg[i]) {
        float sc = S[i * kLdS + j] * scale;
        if (bias != nullptr) sc += to_acc(bias[(tpos[i] - tpos[j] + l.rel0) * p.heads + h]);
        pij = acc_exp(sc - lse_s[i]);
      }
      pr[ii][u] = pij;
      Pm[i * kLdP + j] = from_acc<T>(pij);
    }
  }
  __syncwarp();
  rows_by_rows(dOs, Vs, S, r0);  // dP
  __syncwarp();
#pragma unroll
  for (int ii = 0; ii < 16; ++ii) {
    const int i = r0 + ii;
    float dsum = 0.0f;
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) dsum += pr[ii][u] * S[i * kLdS + lane + kWarp * u];
    const float Di = warp_sum(dsum);
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      const int j = lane + kWarp * u;
      const float ds = pr[ii][u] * (S[i * kLdS + j] - Di);
      dSm[i * kLdP + j] = from_acc<T>(ds);
      // Distinct keys of one row have distinct relative positions: no two lanes collide.
      if (treg[i] >= 0 && treg[j] == treg[i]) tab[tpos[i] - tpos[j] + l.rel0] += ds;
    }
  }
  __syncwarp();
  rows_by_tokens(dSm, Ks, S, r0);  // dQ / scale, staged in the warp's rows of S
  __syncwarp();
  T* dqo = static_cast<T*>(p.dq);
  float* dq_partial = static_cast<float*>(p.dq_partial);
  for (int i = r0; i < r0 + 16; ++i) {
    if (treg[i] < 0) continue;
    const float val = S[i * kLdS + lane] * scale;
    if (p.global_q) {
      dq_partial[(((b * nW + win) * Tn + i) * p.heads + h) * p.d + lane] = val;
    } else {
      dqo[map_offset(p, b, ty[i], tx[i], h) + lane] = from_acc<T>(val);
    }
  }
  __syncthreads();

  // Phase 2: key rows [r0, r0 + 16). dV = P^T dO into S columns [0, 32), dK = dS^T Q into
  // columns [32, 64) of those rows.
  {
    using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
    using ColA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
    using RowB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
    Acc dv[kD / 16], dk[kD / 16];
#pragma unroll
    for (int n = 0; n < kD / 16; ++n) {
      wmma::fill_fragment(dv[n], 0.0f);
      wmma::fill_fragment(dk[n], 0.0f);
    }
#pragma unroll
    for (int kf = 0; kf < kT; kf += 16) {
      // A(key, i) = P[i][key]: the row-major P read column-major.
      ColA pt, dst;
      wmma::load_matrix_sync(pt, Pm + kf * kLdP + r0, kLdP);
      wmma::load_matrix_sync(dst, dSm + kf * kLdP + r0, kLdP);
#pragma unroll
      for (int n = 0; n < kD / 16; ++n) {
        RowB ob, qb;
        wmma::load_matrix_sync(ob, dOs + kf * kLdQ + 16 * n, kLdQ);
        wmma::load_matrix_sync(qb, Qs + kf * kLdQ + 16 * n, kLdQ);
        wmma::mma_sync(dv[n], pt, ob, dv[n]);
        wmma::mma_sync(dk[n], dst, qb, dk[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kD / 16; ++n) {
      wmma::store_matrix_sync(S + r0 * kLdS + 16 * n, dv[n], kLdS, wmma::mem_row_major);
      wmma::store_matrix_sync(S + r0 * kLdS + kD + 16 * n, dk[n], kLdS, wmma::mem_row_major);
    }
  }
  __syncwarp();
  T* dvo = static_cast<T*>(p.dv);
  T* dko = static_cast<T*>(p.dk);
  for (int j = r0; j < r0 + 16; ++j) {
    if (treg[j] < 0) continue;
    const int64_t base = map_offset(p, b, ty[j], tx[j], h);
    dvo[base + lane] = from_acc<T>(S[j * kLdS + lane]);
    dko[base + lane] = from_acc<T>(S[j * kLdS + kD + lane] * scale);
  }

  if (p.dbias_partial != nullptr) {
    __syncthreads();
    float* part = static_cast<float*>(p.dbias_partial) + task * table;
    for (int r = threadIdx.x; r < table; r += blockDim.x) {
      float sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += tables[w * table + r];
      part[r] = sum;
    }
  }
#else
  __trap();  // window_attention_backward_cuda selects this kernel only on sm_80+
#endif
}

template <typename T, int D, int KEYS>
__global__ void __launch_bounds__(kBlock) backward_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Local l(p);
  const int Tn = l.T, ld = l.ld, table = l.table;
  const int64_t nW = p.geo.windows();
  Smem<A> s(smem_raw, Tn, ld, table, true);
  const int64_t task = blockIdx.x;  // (b * nW + win) * heads + h
  const int64_t h = task % p.heads, win = (task / p.heads) % nW, b = task / (p.heads * nW);
  const A* lse = static_cast<const A*>(p.lse);
  for (int e = threadIdx.x; e < kWarps * table; e += blockDim.x) s.tables[e] = 0;
  for (int t = threadIdx.x; t < Tn; t += blockDim.x) {
    s.lse[t] = lse[((b * nW + win) * Tn + t) * p.heads + h];
  }
  load_window<T, A>(p, l, b, win, h, s);
  __syncthreads();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const A scale = static_cast<A>(p.scale);
  A* rowP = s.rowP + warp * Tn;
  A* rowS = s.rowS + warp * Tn;
  A* tab = s.tables + warp * table;
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  A* dq_partial = static_cast<A*>(p.dq_partial);

  // Phase 1: query rows.
  for (int i = warp; i < Tn; i += kWarps) {
    if (s.treg[i] < 0) continue;
    A pr[KEYS], dp[KEYS];
    A dsum = 0;
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int j = lane + kWarp * u;
      pr[u] = 0;
      dp[u] = 0;
      if (j < Tn) {
        pr[u] = acc_exp(score<T, A, D>(p, l, s, h, i, j) - s.lse[i]);
        dp[u] = dot_rows<A, D>(s.dOs + i * ld, s.Vs + j * ld, l.d);
        dsum += pr[u] * dp[u];
      }
    }
    const A D_i = warp_sum(dsum);
    if (lane == 0) s.D[i] = D_i;
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int j = lane + kWarp * u;
      if (j < Tn) {
        const A ds = pr[u] * (dp[u] - D_i);
        rowS[j] = ds;
        // Distinct keys of one row have distinct relative positions: no two lanes collide.
        tab[s.tpos[i] - s.tpos[j] + l.rel0] += ds;
      }
    }
    __syncwarp();
    A o[kChansPerLane];
    weighted_rows<A, D>(rowS, s.Ks, l, lane, o);
#pragma unroll
    for (int u = 0; u < kLaneChans<D>; ++u) {
      const int c = lane + kWarp * u;
      if (c >= l.d) continue;
      if (p.global_q) {
        dq_partial[(((b * nW + win) * Tn + i) * p.heads + h) * p.d + c] = o[u] * scale;
      } else {
        dq[map_offset(p, b, s.ty[i], s.tx[i], h) + c] = from_acc<T>(o[u] * scale);
      }
    }
    __syncwarp();
  }
  __syncthreads();

  // Phase 2: key rows.
  for (int j = warp; j < Tn; j += kWarps) {
    if (s.treg[j] < 0) continue;
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int i = lane + kWarp * u;
      if (i >= Tn) continue;
      A pij = 0, dsij = 0;
      if (s.treg[i] == s.treg[j]) {
        pij = acc_exp(score<T, A, D>(p, l, s, h, i, j) - s.lse[i]);
        dsij = pij * (dot_rows<A, D>(s.dOs + i * ld, s.Vs + j * ld, l.d) - s.D[i]);
      }
      rowP[i] = pij;
      rowS[i] = dsij;
    }
    __syncwarp();
    A gv[kChansPerLane], gk[kChansPerLane];
    weighted_rows<A, D>(rowP, s.dOs, l, lane, gv);
    weighted_rows<A, D>(rowS, s.Qs, l, lane, gk);
    const int64_t base = map_offset(p, b, s.ty[j], s.tx[j], h);
#pragma unroll
    for (int u = 0; u < kLaneChans<D>; ++u) {
      const int c = lane + kWarp * u;
      if (c < l.d) {
        dv[base + c] = from_acc<T>(gv[u]);
        dk[base + c] = from_acc<T>(gk[u]);
      }
    }
    __syncwarp();
  }

  if (p.dbias_partial != nullptr) {
    __syncthreads();
    A* part = static_cast<A*>(p.dbias_partial) + task * table;
    for (int r = threadIdx.x; r < table; r += blockDim.x) {
      A sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += s.tables[w * table + r];
      part[r] = sum;
    }
  }
}

// dbias, first level: chunks[chunk, h, r] = sum of the chunk's kDbiasChunk (image, window)
// blocks, in block order. Consecutive threads take consecutive table rows: coalesced reads.
template <typename T>
__global__ void dbias_chunk_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  const int64_t table = p.geo.table_size(), blocks = p.B * p.geo.windows();
  const int64_t n = dbias_chunk_count(blocks) * p.heads * table;
  const A* part = static_cast<const A*>(p.dbias_partial);
  A* chunks = static_cast<A*>(p.dbias_chunks);
  for (int64_t e = global_thread(); e < n; e += thread_count()) {
    const int64_t r = e % table, h = (e / table) % p.heads, chunk = e / (table * p.heads);
    const int64_t lo = chunk * kDbiasChunk, hi = lo + kDbiasChunk < blocks ? lo + kDbiasChunk : blocks;
    A sum = 0;
    for (int64_t bw = lo; bw < hi; ++bw) sum += part[(bw * p.heads + h) * table + r];
    chunks[e] = sum;
  }
}

// dbias, second level: dbias[r, h] = sum of the chunks, in chunk order.
template <typename T>
__global__ void dbias_reduce_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  const int64_t table = p.geo.table_size(), n_chunks = dbias_chunk_count(p.B * p.geo.windows());
  const A* chunks = static_cast<const A*>(p.dbias_chunks);
  T* dbias = static_cast<T*>(p.dbias);
  for (int64_t e = global_thread(); e < table * p.heads; e += thread_count()) {
    const int64_t r = e % table, h = e / table;
    A sum = 0;
    for (int64_t c = 0; c < n_chunks; ++c) sum += chunks[(c * p.heads + h) * table + r];
    dbias[r * p.heads + h] = from_acc<T>(sum);
  }
}

// Global query: dq[b, t, h, :] = sum over the image's windows, in window order.
template <typename T>
__global__ void dq_reduce_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  const int64_t Tn = p.geo.tokens(), nW = p.geo.windows();
  const int64_t per_image = Tn * p.heads * p.d;
  const A* part = static_cast<const A*>(p.dq_partial);
  T* dq = static_cast<T*>(p.dq);
  for (int64_t e = global_thread(); e < p.B * per_image; e += thread_count()) {
    const int64_t b = e / per_image, rest = e % per_image;
    A sum = 0;
    for (int64_t w = 0; w < nW; ++w) sum += part[(b * nW + w) * per_image + rest];
    dq[e] = from_acc<T>(sum);
  }
}

// The instantiation for this problem: head_dim 32 unrolled, and windows of up to 64 tokens (7x7,
// 8x8) with 2 keys per lane instead of kKeysPerLane, which would leave most of a row's score
// registers, and their exponentials, unused.
using KernelFn = void (*)(WindowParams);
KernelFn pick(KernelFn d32_small, KernelFn d32, KernelFn generic, const WindowParams& p) {
  if (p.d != 32) return generic;
  return p.geo.tokens() <= 2 * kWarp ? d32_small : d32;
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, const WindowParams& p, int64_t smem, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = p.B * p.geo.windows() * p.heads;
  kernel<<<static_cast<unsigned>(blocks), kBlock, smem, stream>>>(p);
  return cudaGetLastError();
}

// Whether forward_tc_kernel covers these parameters on this device.
bool tensor_core_forward(const WindowParams& p) {
  return p.d == tc::kD && p.geo.tokens() <= tc::kT && tensor_core_dtype_on_device(p.dtype);
}

}  // namespace

int64_t window_attention_smem_bytes(const WindowParams& p, bool backward) {
  const int64_t T = p.geo.tokens(), ld = p.d + 1;
  int64_t acc_elems = 3 * T * ld + 2 * kWarps * T;
  if (backward) acc_elems += T * ld + 2 * T + kWarps * p.geo.table_size();
  return acc_elems * acc_bytes(p.dtype) + 4 * T * static_cast<int64_t>(sizeof(int));
}

cudaError_t window_attention_forward_cuda(const WindowParams& p, cudaStream_t stream) {
  if (p.tensor_cores && tensor_core_forward(p)) {
    const auto blocks = static_cast<unsigned>(p.B * p.geo.windows() * p.heads);
    if (p.dtype == DType::Float16) {
      forward_tc_kernel<__half><<<blocks, kBlock, 0, stream>>>(p);
    } else {
      forward_tc_kernel<__nv_bfloat16><<<blocks, kBlock, 0, stream>>>(p);
    }
    return cudaGetLastError();
  }
  const int64_t smem = window_attention_smem_bytes(p, false);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    err = launch(pick(forward_kernel<T, 32, 2>, forward_kernel<T, 32, kKeysPerLane>,
                      forward_kernel<T, 0, kKeysPerLane>, p), p, smem, stream);
  });
  return err;
}

cudaError_t window_attention_backward_cuda(const WindowParams& p, cudaStream_t stream) {
  const bool tensor_cores = p.tensor_cores && tensor_core_forward(p);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
      if (tensor_cores) {
        err = launch(backward_tc_kernel<T>, p, tc::BwdSmem::bytes<T>(static_cast<int>(p.geo.table_size())),
                     stream);
      }
    }
    if (!tensor_cores) {
      err = launch(pick(backward_kernel<T, 32, 2>, backward_kernel<T, 32, kKeysPerLane>,
                        backward_kernel<T, 0, kKeysPerLane>, p),
                   p, window_attention_smem_bytes(p, true), stream);
    }
    if (err != cudaSuccess) return;
    if (p.dbias_partial != nullptr) {
      const int64_t n = p.geo.table_size() * p.heads;
      const int64_t chunked = dbias_chunk_count(p.B * p.geo.windows()) * n;
      dbias_chunk_kernel<T><<<blocks_for(chunked, kThreads), kThreads, 0, stream>>>(p);
      dbias_reduce_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
    }
    if (p.global_q) {
      const int64_t n = p.B * p.geo.tokens() * p.heads * p.d;
      dq_reduce_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
    }
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace window
}  // namespace tokenmix
