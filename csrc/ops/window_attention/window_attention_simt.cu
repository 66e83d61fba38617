// SIMT kernels of windowed attention, for every dtype and window shape the op takes.
//
// The window's Q (pre-scaled), K, V (and dO in backward) are loaded from their original map
// positions into shared memory in the accumulation type, rows padded to d + 1 so that lanes
// reading different tokens hit different banks. A window is small (<= 256 tokens, head_dim
// <= 128): each lane keeps up to 8 scores of a query row in registers, the whole row's softmax is
// two warp reductions, and nothing of size T x T reaches global memory.
//
// Forward: a warp per query row: scores + bias + region mask, softmax, P V; saves the row's
//   log-sum-exp.
// Backward: phase 1, a warp per query row: P from the saved log-sum-exp, dP = dO V^T,
//   D = rowsum(P * dP), dS = P (dP - D), dQ = scale dS K, bias gradient into a per-warp table;
//   phase 2, a warp per key row: P and dS of its column recomputed, dV = P^T dO, dK = dS^T Qs.
//   The per-warp bias tables are summed in warp order per block into the block's partial
//   (window_attention_reduce.cu sums those).
// Index math inside a window is 32-bit, and a pair's bias-table row is the difference of two
// per-token terms kept in shared memory (relative_pos): the 64-bit divisions of relative_index,
// four per score, cost more than the score's 32-term dot product. head_dim 32 (every Swin and
// GC ViT variant) is a compile-time constant, so the dot products and channel loops unroll, and
// windows of up to 64 tokens keep 2 scores per lane instead of 8.
// Loads: where q, k, v (and dO) rows start on 16-byte boundaries (WindowParams::vec_rows) a thread
// issues the 16-byte loads of two pieces of every matrix (6 or 8 loads) before storing any; else
// an element per thread and iteration. The head's slice of the bias table is staged in shared
// memory once per block, so score() reads no global memory. Token coordinates are not kept (their
// 64-bit rows and columns cost a block of occupancy): only the output row of each token.
// Occupancy on sm_90, 128 threads, Swin's 7 x 7 windows with head_dim 32 and a bias table, fp32
// accumulation (fp16/bf16/fp32), shared memory 8 T + 4 (3 T (d + 1) + 4 T + table) + 8 T bytes:
//   forward  <T, 32, 2>: 21648 B + 1 KB reserved = 22672 B -> 10 blocks (233472 / 22672); 48
//     registers (the launch bounds ask for 10 blocks) -> 6 KB per block, 10 blocks: 40 warps/SM.
//   backward <T, 32, 2>: adds dO, D, lse, rowS and 4 warp tables: 31996 B + 1 KB = 33020 B -> 7
//     blocks; ~64 registers (8 KB per block) allow 8: 28 warps/SM, bound by shared memory.
// fp64 doubles the accumulation-type arrays (5 and 3 blocks). The kernels are latency bound (a
// block moves ~13 KB forward, ~22 KB backward, for 0.3-0.8 MFLOP of FMA on CUDA cores): what
// counts is the loads in flight per SM and how many blocks hide each other's barriers.
// Limits: tokens per window <= 256, head_dim <= 128, shared memory within the device's opt-in
// limit (checked by the launcher with window_attention_smem_bytes).

#include <cstdint>

#include "window_attention_cuda.cuh"

namespace tokenmix {
namespace window_attention {
namespace {

using namespace cu;

int64_t acc_bytes(DType t) {
  return t == DType::Float64 ? 8 : 4;
}

// Shared-memory layout of one block (int64 arrays first, then accumulation-type arrays, then int
// arrays). Token coordinates are recomputed where rows are loaded, not kept: a block's only
// 64-bit array is the tokens' output rows.
template <typename A>
struct Smem {
  int64_t* mo;            // row offset in the contiguous [B, H, W, heads, d] tensors (out, grad)
  A *Qs, *Ks, *Vs, *dOs;  // [T, d + 1]
  A *D, *lse;             // [T] (backward)
  A *rowP, *rowS;         // [kWarps, T] (rowS: backward)
  A* tables;              // [kWarps, table] (backward)
  A* bias;                // [table]: the head's slice of the bias table (when there is one)
  int* treg;              // Swin region (-1: outside the map)
  int* tpos;              // relative_pos of each token (window_attention_math.h)

  __device__ Smem(unsigned char* raw, int T, int ld, int table, bool backward, bool has_bias) {
    mo = reinterpret_cast<int64_t*>(raw);
    A* a = reinterpret_cast<A*>(mo + T);
    Qs = a;
    Ks = Qs + T * ld;
    Vs = Ks + T * ld;
    rowP = Vs + T * ld;
    a = rowP + kWarps * T;
    if (backward) {
      rowS = a;
      dOs = rowS + kWarps * T;
      D = dOs + T * ld;
      lse = D + T;
      tables = lse + T;
      a = tables + kWarps * table;
    } else {
      rowS = dOs = D = lse = tables = nullptr;
    }
    bias = has_bias ? a : nullptr;
    a += has_bias ? table : 0;
    treg = reinterpret_cast<int*>(a);
    tpos = treg + T;
  }
};

// Pieces a thread loads per round of load_rows_vec: with q, k, v (and dO) 6 (8) independent
// 16-byte loads in flight before the first store.
constexpr int kRoundPieces = 2;

// The element i of a 16-byte piece.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type piece_elem(const uint4& u, int i) {
  return to_acc(reinterpret_cast<const T*>(&u)[i]);
}

// Q (scaled), K, V (, dO) rows 16 bytes (kVec elements) at a time (p.vec_rows), converted to the
// accumulation type in shared memory. Same addresses as load_rows_scalar: piece n covers channels
// [c0, c0 + kVec) of token t (vector_piece).
template <typename T, typename A, int D>
__device__ void load_rows_vec(const WindowParams& p, const Local& l, const RowBase& rb,
                              int64_t oy, int64_t ox, Smem<A>& s) {
  constexpr int kVec = 16 / sizeof(T);
  const int d = D > 0 ? D : l.d;
  const int pieces = l.T * d / kVec;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  const bool backward = s.dOs != nullptr;
  const A scale = static_cast<A>(p.scale);
  for (int n0 = threadIdx.x; n0 < pieces; n0 += kRoundPieces * kBlock) {
    uint4 qv[kRoundPieces], kv[kRoundPieces], vv[kRoundPieces], gv[kRoundPieces];
#pragma unroll
    for (int u = 0; u < kRoundPieces; ++u) {
      const int n = n0 + kBlock * u;
      qv[u] = kv[u] = vv[u] = gv[u] = make_uint4(0, 0, 0, 0);
      if (n >= pieces) continue;
      int t = 0, c0 = 0;
      vector_piece(n, d, kVec, &t, &c0);
      const bool exists = s.treg[t] >= 0;
      int64_t y = 0, x = 0;
      token_coords(p.geo, oy, ox, t, &y, &x);
      const TokenRows r = token_rows(p, l, rb, t, y, x);
      if (p.global_q || exists) qv[u] = *reinterpret_cast<const uint4*>(q + r.q + c0);
      if (exists) {
        kv[u] = *reinterpret_cast<const uint4*>(k + r.k + c0);
        vv[u] = *reinterpret_cast<const uint4*>(v + r.v + c0);
        if (backward) gv[u] = *reinterpret_cast<const uint4*>(grad + r.g + c0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRoundPieces; ++u) {
      const int n = n0 + kBlock * u;
      if (n >= pieces) continue;
      int t = 0, c0 = 0;
      vector_piece(n, d, kVec, &t, &c0);
      const int at = t * l.ld + c0;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        // Zero bits are a zero of every dtype (q's times the scale still one): the scalar
        // path's zeros.
        s.Qs[at + i] = piece_elem<T>(qv[u], i) * scale;
        s.Ks[at + i] = piece_elem<T>(kv[u], i);
        s.Vs[at + i] = piece_elem<T>(vv[u], i);
        if (backward) s.dOs[at + i] = piece_elem<T>(gv[u], i);
      }
    }
  }
}

// The fallback for rows that are not 16-byte aligned: an element per thread and iteration.
template <typename T, typename A>
__device__ void load_rows_scalar(const WindowParams& p, const Local& l, const RowBase& rb,
                                 int64_t oy, int64_t ox, Smem<A>& s) {
  const int Tn = l.T, d = l.d, ld = l.ld;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  const A scale = static_cast<A>(p.scale);
  for (int e = threadIdx.x; e < Tn * d; e += blockDim.x) {
    const int t = e / d, c = e - t * d;
    const bool exists = s.treg[t] >= 0;
    int64_t y = 0, x = 0;
    token_coords(p.geo, oy, ox, t, &y, &x);
    const TokenRows r = token_rows(p, l, rb, t, y, x);
    A qv = 0, kv = 0, vv = 0, gv = 0;
    if (p.global_q || exists) qv = to_acc(q[r.q + c]) * scale;
    if (exists) {
      kv = to_acc(k[r.k + c]);
      vv = to_acc(v[r.v + c]);
      if (s.dOs != nullptr) gv = to_acc(grad[r.g + c]);
    }
    s.Qs[t * ld + c] = qv;
    s.Ks[t * ld + c] = kv;
    s.Vs[t * ld + c] = vv;
    if (s.dOs != nullptr) s.dOs[t * ld + c] = gv;
  }
}

// Window tokens' regions, relative positions and output rows, then Q (scaled), K, V and optionally
// dO, and the head's slice of the bias table (its first 2 kBlock entries loaded with the rows,
// stored after them), into shared memory.
template <typename T, typename A, int D>
__device__ void load_window(const WindowParams& p, const Local& l, const Task& task, Smem<A>& s) {
  const Geometry& g = p.geo;
  int64_t oy = 0, ox = 0;
  window_origin(g, task.win, &oy, &ox);
  const RowBase rb(p, task.b, task.h);
  for (int t = threadIdx.x; t < l.T; t += blockDim.x) {
    int64_t sy = 0, sx = 0;
    const bool exists = shifted_coords_from(g, oy, ox, t, &sy, &sx);
    s.treg[t] = exists ? region(g, sy, sx) : -1;
    s.tpos[t] = relative_pos(g, t);
    s.mo[t] = exists ? row_offset(rb.map, rb.map_sy, rb.map_sx, original_row(g, sy),
                                  original_col(g, sx))
                     : 0;
  }
  __syncthreads();
  const T* table = static_cast<const T*>(p.bias_table);
  A bias[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int r = threadIdx.x + kBlock * u;
    bias[u] = table != nullptr && r < l.table ? to_acc(table[bias_table_offset(r, p.heads, task.h)])
                                              : A(0);
  }
  if (p.vec_rows) {
    load_rows_vec<T, A, D>(p, l, rb, oy, ox, s);
  } else {
    load_rows_scalar<T, A>(p, l, rb, oy, ox, s);
  }
  if (table != nullptr) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int r = threadIdx.x + kBlock * u;
      if (r < l.table) s.bias[r] = bias[u];
    }
    for (int r = threadIdx.x + 2 * kBlock; r < l.table; r += kBlock) {
      s.bias[r] = to_acc(table[bias_table_offset(r, p.heads, task.h)]);
    }
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
  if (s.bias != nullptr) acc += s.bias[s.tpos[i] - s.tpos[j] + l.rel0];
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

// KEYS == 2 (Swin's windows): at most 48 registers, so that the 10 blocks shared memory allows
// fit (banner); the other instantiations ask for no minimum (0) and keep the compiler's choice.
template <typename T, int D, int KEYS>
__global__ void __launch_bounds__(kBlock, KEYS == 2 ? 10 : 0) forward_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Local l(p);
  const int Tn = l.T;
  const int64_t nW = p.geo.windows();
  Smem<A> s(smem_raw, Tn, l.ld, l.table, false, p.bias_table != nullptr);
  const Task task(p);
  const int64_t h = task.h, win = task.win, b = task.b;
  load_window<T, A, D>(p, l, task, s);
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
    const int64_t base = s.mo[i];
#pragma unroll
    for (int u = 0; u < kLaneChans<D>; ++u) {
      const int c = lane + kWarp * u;
      if (c < l.d) out[base + c] = from_acc<T>(o[u]);
    }
    if (lane == 0 && lse != nullptr) lse[((b * nW + win) * Tn + i) * p.heads + h] = m + acc_log(sum);
    __syncwarp();
  }
}

template <typename T, int D, int KEYS>
__global__ void __launch_bounds__(kBlock) backward_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Local l(p);
  const int Tn = l.T, ld = l.ld, table = l.table;
  const int64_t nW = p.geo.windows();
  Smem<A> s(smem_raw, Tn, ld, table, true, p.bias_table != nullptr);
  const Task task(p);
  const int64_t h = task.h, win = task.win, b = task.b;
  const A* lse = static_cast<const A*>(p.lse);
  for (int e = threadIdx.x; e < kWarps * table; e += blockDim.x) s.tables[e] = 0;
  load_window<T, A, D>(p, l, task, s);
  __syncthreads();
  // The forward saves no log-sum-exp for tokens outside the map (treg < 0): never read those.
  for (int t = threadIdx.x; t < Tn; t += blockDim.x) {
    s.lse[t] = s.treg[t] >= 0 ? lse[((b * nW + win) * Tn + t) * p.heads + h] : A(0);
  }
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
        dq[s.mo[i] + c] = from_acc<T>(o[u] * scale);
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
    const int64_t base = s.mo[j];
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
    A* part = static_cast<A*>(p.dbias_partial) + task.task * table;
    for (int r = threadIdx.x; r < table; r += blockDim.x) {
      A sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += s.tables[w * table + r];
      part[r] = sum;
    }
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

// The forward or backward kernel pick() chooses for p, launched.
template <bool kBackward>
cudaError_t launch_simt(const WindowParams& p, cudaStream_t stream) {
  const int64_t smem = window_attention_smem_bytes(p, kBackward);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    KernelFn kernel;
    if constexpr (kBackward) {
      kernel = pick(backward_kernel<T, 32, 2>, backward_kernel<T, 32, kKeysPerLane>,
                    backward_kernel<T, 0, kKeysPerLane>, p);
    } else {
      kernel = pick(forward_kernel<T, 32, 2>, forward_kernel<T, 32, kKeysPerLane>,
                    forward_kernel<T, 0, kKeysPerLane>, p);
    }
    err = launch_per_window(kernel, p, smem, stream);
  });
  return err;
}

}  // namespace

int64_t window_attention_smem_bytes(const WindowParams& p, bool backward) {
  const int64_t T = p.geo.tokens(), ld = p.d + 1;
  int64_t acc_elems = 3 * T * ld + kWarps * T;
  if (backward) acc_elems += kWarps * T + T * ld + 2 * T + kWarps * p.geo.table_size();
  if (p.bias_table != nullptr) acc_elems += p.geo.table_size();
  return T * static_cast<int64_t>(sizeof(int64_t)) + acc_elems * acc_bytes(p.dtype) +
         2 * T * static_cast<int64_t>(sizeof(int));
}

cudaError_t simt_attention_cuda(const WindowParams& p, bool backward, cudaStream_t stream) {
  return backward ? launch_simt<true>(p, stream) : launch_simt<false>(p, stream);
}

}  // namespace window_attention
}  // namespace tokenmix
