// Tensor-core kernels of windowed attention, for what Swin and GC ViT run: fp16/bf16, head_dim
// 32, windows of at most 64 tokens, on devices of compute capability >= 8.0 (see each kernel's
// banner). The launchers of window_attention_cuda.cu take them where tensor_cores_cover() says so
// and TOKENMIX_WINDOW_TENSOR_CORES is not 0.

#include <mma.h>

#include <cstdint>

#include "window_attention_cuda.cuh"

namespace tokenmix {
namespace window_attention {
namespace {

using namespace cu;

// Tensor-core forward for what Swin and GC ViT run: fp16/bf16, head_dim 32, windows of at most
// 64 tokens (padded to 64). WMMA 16x16x16 with fp32 accumulation; warp w owns query rows
// [16 w, 16 w + 16): S = Q K^T for its rows, then per row the scale, bias (the head's slice of the
// table, staged in shared memory once per block), region mask and softmax in fp32 (scores and the
// log-sum-exp as the SIMT kernels compute them, up to summation order), P rounded to the input
// dtype as eager attention does and written over the row's scores, O = P V, written from shared
// memory with a lane per channel. Padding tokens and tokens outside the map are zero rows of Q, K
// and V and masked keys. Limits: sm_80+ (bf16 fragments).
// Occupancy on sm_90: 128 threads; static shared memory 15360 (Q, K, V) + 17408 (S, then P, then
// O) + 900 (bias) + 1536 (coordinates, regions, positions), 35328 B aligned; 36352 B with the
// 1 KB the driver reserves per block: 6 blocks (233472 / 36352), 24 warps per SM; registers (<= 80 by
// the launch bounds, 10 KB per block) allow 6 as well. A block moves ~13 KB (Q, K, V in, O out)
// for ~0.5 MFLOP of MMA: memory and latency bound; the 16-byte row loads keep 6 x 16 B per
// thread (72 KB per SM) in flight.
namespace tc {
constexpr int kT = 64, kD = 32;
constexpr int kLdQ = kD + 8;   // Qs, Ks, Vs: [kT][kLdQ] in the input dtype
constexpr int kLdS = kT + 4;   // S (then O): [kT][kLdS] fp32
constexpr int kLdP = kT + 8;   // P: [kT][kLdP] in the input dtype
constexpr int kLdP2 = 2 * kLdS;  // P over S in forward: the input dtype, a row of S apart
constexpr int kRegionPad = -2;  // treg of padding rows: never equal to a real region or to -1

// A window as the tensor-core kernels hold it in shared memory: tokens padded to kT, rows of the
// input dtype kLdQ apart; dO and the saved log-sum-exp only in backward (else null); the head's
// slice of the bias table in fp32 (when there is a table).
template <typename T>
struct Window {
  T *Qs, *Ks, *Vs, *dOs;
  float* lse;
  float* bias;
  int64_t *ty, *tx;
  int *treg, *tpos;
};

// Bias-table entries per head the kernels stage: (2 wh - 1)(2 ww - 1) is largest, for windows of
// at most kT tokens, at 8 x 8.
constexpr int kMaxTable = 225;
constexpr int kVec = 8;                    // channels of a 16-byte piece
constexpr int kPieces = kT * kD / kVec;    // 16-byte pieces of one [kT][kD] matrix
constexpr int kPiecesPerThread = kPieces / kBlock;
static_assert(kPieces % kBlock == 0, "whole pieces per thread");
constexpr int kTableLoads = (kMaxTable + kBlock - 1) / kBlock;

// Q, K, V (, dO) rows 16 bytes at a time (p.vec_rows): each thread first issues the loads of its
// kPiecesPerThread pieces of every matrix, then stores them, so that 6 (forward) or 8 (backward)
// independent 16-byte loads per thread are in flight at once. Same addresses as the scalar path:
// piece n covers channels [c0, c0 + 8) of token t (vector_piece).
template <typename T>
__device__ __forceinline__ void load_rows_vec(const WindowParams& p, const Local& l,
                                              const RowBase& rb, const Window<T>& w) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  const bool backward = w.dOs != nullptr;
  uint4 qv[kPiecesPerThread], kv[kPiecesPerThread], vv[kPiecesPerThread], gv[kPiecesPerThread];
#pragma unroll
  for (int u = 0; u < kPiecesPerThread; ++u) {
    int t = 0, c0 = 0;
    vector_piece(threadIdx.x + kBlock * u, kD, kVec, &t, &c0);
    qv[u] = kv[u] = vv[u] = gv[u] = make_uint4(0, 0, 0, 0);
    const bool exists = w.treg[t] >= 0;
    const TokenRows r = token_rows(p, l, rb, t, w.ty[t], w.tx[t]);
    if (p.global_q ? t < l.T : exists) qv[u] = *reinterpret_cast<const uint4*>(q + r.q + c0);
    if (exists) {
      kv[u] = *reinterpret_cast<const uint4*>(k + r.k + c0);
      vv[u] = *reinterpret_cast<const uint4*>(v + r.v + c0);
      if (backward) gv[u] = *reinterpret_cast<const uint4*>(grad + r.g + c0);
    }
  }
#pragma unroll
  for (int u = 0; u < kPiecesPerThread; ++u) {
    int t = 0, c0 = 0;
    vector_piece(threadIdx.x + kBlock * u, kD, kVec, &t, &c0);
    *reinterpret_cast<uint4*>(w.Qs + t * kLdQ + c0) = qv[u];
    *reinterpret_cast<uint4*>(w.Ks + t * kLdQ + c0) = kv[u];
    *reinterpret_cast<uint4*>(w.Vs + t * kLdQ + c0) = vv[u];
    if (backward) *reinterpret_cast<uint4*>(w.dOs + t * kLdQ + c0) = gv[u];
  }
}

// The fallback for rows that are not 16-byte aligned: an element per thread and iteration.
template <typename T>
__device__ __forceinline__ void load_rows_scalar(const WindowParams& p, const Local& l,
                                                 const RowBase& rb, const Window<T>& w) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* grad = static_cast<const T*>(p.grad);
  const T zero = from_acc<T>(0.0f);
  for (int e = threadIdx.x; e < kT * kD; e += blockDim.x) {
    const int t = e / kD, c = e % kD;
    const bool exists = w.treg[t] >= 0;
    const TokenRows r = token_rows(p, l, rb, t, w.ty[t], w.tx[t]);
    T qv = zero, kv = zero, vv = zero, gv = zero;
    if (p.global_q ? t < l.T : exists) qv = q[r.q + c];
    if (exists) {
      kv = k[r.k + c];
      vv = v[r.v + c];
      if (w.dOs != nullptr) gv = grad[r.g + c];
    }
    w.Qs[t * kLdQ + c] = qv;
    w.Ks[t * kLdQ + c] = kv;
    w.Vs[t * kLdQ + c] = vv;
    if (w.dOs != nullptr) w.dOs[t * kLdQ + c] = gv;
  }
}

// Fills w for window `win` of image b, head h: coordinates, region (-1 outside the map,
// kRegionPad for padding), relative positions, then Q (unscaled), K, V (, dO, lse) and the bias
// slice; zeros where a token has no value. Ends with a block barrier.
template <typename T>
__device__ void load_window(const WindowParams& p, const Local& l, const Task& task,
                            const Window<T>& w) {
  const Geometry& g = p.geo;
  const int64_t nW = g.windows();
  int64_t oy = 0, ox = 0;
  window_origin(g, task.win, &oy, &ox);
  for (int t = threadIdx.x; t < kT; t += blockDim.x) {
    bool exists = false;
    if (t < l.T) {
      exists = place_token(g, oy, ox, t, w.ty, w.tx, w.treg, w.tpos);
    } else {
      w.ty[t] = w.tx[t] = w.tpos[t] = 0;
      w.treg[t] = kRegionPad;
    }
    if (w.lse != nullptr) {
      w.lse[t] = exists ? static_cast<const float*>(
                              p.lse)[((task.b * nW + task.win) * l.T + t) * p.heads + task.h]
                        : 0.0f;
    }
  }
  __syncthreads();
  // The bias slice's loads go out with the rows' and land in shared memory after them.
  const T* table = static_cast<const T*>(p.bias_table);
  float bias[kTableLoads];
#pragma unroll
  for (int u = 0; u < kTableLoads; ++u) {
    const int r = threadIdx.x + kBlock * u;
    bias[u] = table != nullptr && r < l.table
                  ? to_acc(table[bias_table_offset(r, p.heads, task.h)])
                  : 0.0f;
  }
  const RowBase rb(p, task.b, task.h);
  if (p.vec_rows) {
    load_rows_vec(p, l, rb, w);
  } else {
    load_rows_scalar(p, l, rb, w);
  }
#pragma unroll
  for (int u = 0; u < kTableLoads; ++u) {
    const int r = threadIdx.x + kBlock * u;
    if (r < l.table) w.bias[r] = bias[u];
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
  // The forward kernel stores O over the P it read (the same rows of S).
  __syncwarp();
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

// A M over the tokens for the warp's rows of A ([kT][lda]) and M ([kT][kLdQ], row-major):
// O = P V in forward, dS K in backward.
template <typename T>
__device__ void rows_by_tokens(const T* A, int lda, const T* M, float* S, int r0) {
  rows_product<T, nvcuda::wmma::row_major, kD, kT>(A, lda, M, kLdQ, kLdQ, 1, S, r0);
}
}  // namespace tc

template <typename T>
__global__ void __launch_bounds__(kBlock, 6) forward_tc_kernel(WindowParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace tc;
  static_assert(sizeof(T) == 2, "fp16 / bf16: P is stored over S with kLdP2");
  __shared__ __align__(128) T Qs[kT * kLdQ];
  __shared__ __align__(128) T Ks[kT * kLdQ];
  __shared__ __align__(128) T Vs[kT * kLdQ];
  __shared__ __align__(128) float S[kT * kLdS];
  __shared__ float bias_s[kMaxTable];
  __shared__ int64_t ty[kT], tx[kT];
  __shared__ int treg[kT], tpos[kT];

  const Geometry& g = p.geo;
  const Local l(p);
  const int Tn = l.T;
  const int64_t nW = g.windows();
  const Task task(p);
  const int64_t b = task.b, win = task.win, h = task.h;
  load_window<T>(p, l, task, Window<T>{Qs, Ks, Vs, nullptr, nullptr, bias_s, ty, tx, treg, tpos});

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, r0 = 16 * warp;
  rows_by_rows(Qs, Ks, S, r0);
  __syncwarp();

  const float scale = static_cast<float>(p.scale);
  const bool has_bias = p.bias_table != nullptr;
  float* lse = static_cast<float*>(p.lse);
  // P of row i goes over the row's own scores, as the input dtype (kLdP2 elements apart), once
  // the whole row is in registers.
  T* Ps = reinterpret_cast<T*>(S);
  // The lane's keys are the same for every row.
  int kreg[kT / kWarp], kpos[kT / kWarp];
#pragma unroll
  for (int u = 0; u < kT / kWarp; ++u) {
    kreg[u] = treg[lane + kWarp * u];
    kpos[u] = tpos[lane + kWarp * u];
  }
  for (int i = r0; i < r0 + 16; ++i) {
    const int ireg = treg[i], ipos = tpos[i] + l.rel0;
    float sc[kT / kWarp];
    float m = neg_inf<float>();
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      const int j = lane + kWarp * u;
      sc[u] = neg_inf<float>();
      if (ireg >= 0 && kreg[u] == ireg) {
        sc[u] = S[i * kLdS + j] * scale;
        if (has_bias) sc[u] += bias_s[ipos - kpos[u]];
      }
      m = max_nan(m, sc[u]);
    }
    m = warp_max(m);
    float sum = 0;
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      sc[u] = ireg >= 0 ? acc_exp(sc[u] - m) : 0.0f;
      sum += sc[u];
    }
    sum = warp_sum(sum);
    __syncwarp();  // every lane has read row i of S before P overwrites it
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      Ps[i * kLdP2 + lane + kWarp * u] = from_acc<T>(ireg >= 0 ? sc[u] / sum : 0.0f);
    }
    if (lane == 0 && lse != nullptr && ireg >= 0) {
      lse[((b * nW + win) * Tn + i) * p.heads + h] = m + acc_log(sum);
    }
  }
  __syncwarp();
  rows_by_tokens(Ps, kLdP2, Vs, S, r0);  // O = P V over the warp's own rows of S
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  const RowBase rb(p, b, h);
  for (int i = r0; i < r0 + 16; ++i) {
    if (treg[i] < 0) continue;
    out[row_offset(rb.map, rb.map_sy, rb.map_sx, ty[i], tx[i]) + lane] =
        from_acc<T>(S[i * kLdS + lane]);
  }
#else
  __trap();  // window_attention_forward_cuda selects this kernel only on sm_80+
#endif
}

// Tensor-core backward for the forward_tc_kernel cases. Phase 1, warp w on query rows
// [16 w, 16 w + 16): S = Q K^T, P from the saved log-sum-exp (fp32, kept in registers), dP = dO
// V^T, D = rowsum(P dP), dS = P (dP - D) (into shared memory and the warp's bias table), dQ =
// scale dS K. Then K and V are dead, and P, rounded to the input dtype, goes over them. Phase 2,
// warp w on key rows [16 w, 16 w + 16): dV = P^T dO and dK = scale dS^T Q, read column-major out
// of the row-major P and dS. The bias table and the global query's dQ go through the same
// deterministic reductions as the SIMT backward. Limits as forward_tc_kernel.
namespace tc {
// Shared-memory carve-up of backward_tc_kernel (byte offsets), each array starting on a 128-byte
// boundary (WMMA needs 32-byte aligned tiles); one definition for the launcher's size and the
// kernel's pointers.
struct BwdSmem {
  static constexpr int kQKV = kT * kLdQ;  // elements of each of Qs, Ks, Vs, dOs
  int64_t qs, dos, kv, s, dsm, lse, tables, bias, ty, tx, treg, tpos, total;
  __host__ __device__ static int64_t round(int64_t bytes) { return (bytes + 127) / 128 * 128; }
  __host__ __device__ static int64_t take(int64_t* at, int64_t bytes) {
    const int64_t here = *at;
    *at += round(bytes);
    return here;
  }
  // elem: bytes of the input dtype (2); table: bias-table entries per head.
  __host__ __device__ BwdSmem(int64_t elem, int64_t table) {
    int64_t at = 0;
    qs = take(&at, kQKV * elem);
    dos = take(&at, kQKV * elem);
    kv = take(&at, 2 * kQKV * elem);  // Ks, Vs; then P (kT x kLdP) for phase 2
    s = take(&at, kT * kLdS * 4);
    dsm = take(&at, kT * kLdP * elem);
    lse = take(&at, kT * 4);
    tables = take(&at, int64_t{kWarps} * table * 4);
    bias = take(&at, table * 4);
    ty = take(&at, kT * 8);
    tx = take(&at, kT * 8);
    treg = take(&at, kT * 4);
    tpos = take(&at, kT * 4);
    total = at;
  }
};
static_assert(kT * kLdP <= 2 * BwdSmem::kQKV, "P fits where K and V were");
}  // namespace tc

// Occupancy on sm_90 (7 x 7 windows, fp16/bf16): 128 threads; dynamic shared memory 20480 (Q, dO)
// + 10240 (K, V, then P) + 17408 (S) + 9216 (dS) + 256 (lse) + 2816 (warp tables) + 768 (bias)
// + 1536 (coordinates, regions, positions) = 52480 B, 53504 B with the 1 KB the driver reserves
// per block: 4 blocks (233472 / 53504), 16 warps per SM (8 x 8 windows: 53632 + 1024, also 4).
// Registers (<= 128 by the launch bounds: 16 KB per block) also allow 4. A block
// moves ~22 KB (Q, K, V, dO in; dQ, dK, dV out) for ~1.3 MFLOP of MMA: memory and latency bound, not tensor-core bound; the
// 16-byte row loads keep 8 x 16 B per thread (64 KB per SM) in flight.
template <typename T>
__global__ void __launch_bounds__(kBlock, 4) backward_tc_kernel(WindowParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace tc;
  static_assert(sizeof(T) == 2, "fp16 / bf16");
  // The only shared memory of this kernel, so it starts at the block's (aligned) window.
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const Geometry& g = p.geo;
  const Local l(p);
  const int Tn = l.T, table = l.table;
  const BwdSmem lay(sizeof(T), table);
  T* Qs = reinterpret_cast<T*>(smem_tc + lay.qs);
  T* dOs = reinterpret_cast<T*>(smem_tc + lay.dos);
  T* Ks = reinterpret_cast<T*>(smem_tc + lay.kv);
  T* Vs = Ks + BwdSmem::kQKV;
  T* Pm = Ks;  // phase 2 only
  float* S = reinterpret_cast<float*>(smem_tc + lay.s);
  T* dSm = reinterpret_cast<T*>(smem_tc + lay.dsm);
  float* lse_s = reinterpret_cast<float*>(smem_tc + lay.lse);
  float* tables = reinterpret_cast<float*>(smem_tc + lay.tables);
  float* bias_s = reinterpret_cast<float*>(smem_tc + lay.bias);
  int64_t* ty = reinterpret_cast<int64_t*>(smem_tc + lay.ty);
  int64_t* tx = reinterpret_cast<int64_t*>(smem_tc + lay.tx);
  int* treg = reinterpret_cast<int*>(smem_tc + lay.treg);
  int* tpos = reinterpret_cast<int*>(smem_tc + lay.tpos);

  const int64_t nW = g.windows();
  const Task task(p);
  const int64_t b = task.b, win = task.win, h = task.h;
  for (int e = threadIdx.x; e < kWarps * table; e += blockDim.x) tables[e] = 0;
  load_window<T>(p, l, task, Window<T>{Qs, Ks, Vs, dOs, lse_s, bias_s, ty, tx, treg, tpos});

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, r0 = 16 * warp;
  const float scale = static_cast<float>(p.scale);
  const bool has_bias = p.bias_table != nullptr;
  float* tab = tables + warp * table;
  // The lane's keys are the same for every row.
  int kreg[kT / kWarp], kpos[kT / kWarp];
#pragma unroll
  for (int u = 0; u < kT / kWarp; ++u) {
    kreg[u] = treg[lane + kWarp * u];
    kpos[u] = tpos[lane + kWarp * u];
  }

  // Phase 1: P from the scores, kept in fp32 registers for dS (and phase 2's P).
  rows_by_rows(Qs, Ks, S, r0);
  __syncwarp();
  float pr[16][kT / kWarp];
#pragma unroll
  for (int ii = 0; ii < 16; ++ii) {
    const int i = r0 + ii;
    const int ireg = treg[i], ipos = tpos[i] + l.rel0;
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      const int j = lane + kWarp * u;
      float pij = 0.0f;
      if (ireg >= 0 && kreg[u] == ireg) {
        float sc = S[i * kLdS + j] * scale;
        if (has_bias) sc += bias_s[ipos - kpos[u]];
        pij = acc_exp(sc - lse_s[i]);
      }
      pr[ii][u] = pij;
    }
  }
  __syncwarp();
  rows_by_rows(dOs, Vs, S, r0);  // dP
  __syncwarp();
#pragma unroll
  for (int ii = 0; ii < 16; ++ii) {
    const int i = r0 + ii;
    const int ireg = treg[i], ipos = tpos[i] + l.rel0;
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
      if (ireg >= 0 && kreg[u] == ireg) tab[ipos - kpos[u]] += ds;
    }
    // Other rows do reach the same entries from other lanes: order each row's updates before
    // the next row's.
    __syncwarp();
  }
  rows_by_tokens(dSm, kLdP, Ks, S, r0);  // dQ / scale, staged in the warp's rows of S
  __syncwarp();
  T* dqo = static_cast<T*>(p.dq);
  float* dq_partial = static_cast<float*>(p.dq_partial);
  const RowBase rb(p, b, h);
  for (int i = r0; i < r0 + 16; ++i) {
    if (treg[i] < 0) continue;
    const float val = S[i * kLdS + lane] * scale;
    if (p.global_q) {
      dq_partial[(((b * nW + win) * Tn + i) * p.heads + h) * p.d + lane] = val;
    } else {
      dqo[row_offset(rb.map, rb.map_sy, rb.map_sx, ty[i], tx[i]) + lane] = from_acc<T>(val);
    }
  }
  __syncthreads();
  // Every warp is done with K and V: P, rounded as eager attention rounds it, goes over them.
#pragma unroll
  for (int ii = 0; ii < 16; ++ii) {
#pragma unroll
    for (int u = 0; u < kT / kWarp; ++u) {
      Pm[(r0 + ii) * kLdP + lane + kWarp * u] = from_acc<T>(pr[ii][u]);
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
    const int64_t base = row_offset(rb.map, rb.map_sy, rb.map_sx, ty[j], tx[j]);
    dvo[base + lane] = from_acc<T>(S[j * kLdS + lane]);
    dko[base + lane] = from_acc<T>(S[j * kLdS + kD + lane] * scale);
  }

  if (p.dbias_partial != nullptr) {
    __syncthreads();
    float* part = static_cast<float*>(p.dbias_partial) + task.task * table;
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

}  // namespace

// Whether the tensor-core kernels cover these parameters on this device.
bool tensor_cores_cover(const WindowParams& p) {
  return p.d == tc::kD && p.geo.tokens() <= tc::kT && p.geo.table_size() <= tc::kMaxTable &&
         tensor_core_dtype_on_device(p.dtype);
}

// fp16 or bf16 (tensor_cores_cover() accepts no other dtype).
cudaError_t tc_attention_cuda(const WindowParams& p, bool backward, cudaStream_t stream) {
  const bool half = p.dtype == DType::Float16;
  if (backward) {
    const int64_t smem = tc::BwdSmem(2, p.geo.table_size()).total;
    return half ? launch_per_window(backward_tc_kernel<__half>, p, smem, stream)
                : launch_per_window(backward_tc_kernel<__nv_bfloat16>, p, smem, stream);
  }
  // Static shared memory only: no dynamic allowance.
  return half ? launch_per_window(forward_tc_kernel<__half>, p, 0, stream)
              : launch_per_window(forward_tc_kernel<__nv_bfloat16>, p, 0, stream);
}

}  // namespace window_attention
}  // namespace tokenmix
