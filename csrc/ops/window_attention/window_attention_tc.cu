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
  int64_t *ty, *tx;
  int *treg, *tpos;
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
      const int64_t y = w.ty[t], x = w.tx[t];
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
  __shared__ int64_t ty[kT], tx[kT];
  __shared__ int treg[kT], tpos[kT];

  const Geometry& g = p.geo;
  const Local l(p);
  const int Tn = l.T;
  const int64_t nW = g.windows();
  const int64_t task = p.task0 + blockIdx.x;  // (b * nW + win) * heads + h
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
           round(kT * 4) + round(int64_t{kWarps} * table * 4) + 2 * round(kT * sizeof(int64_t)) +
           2 * round(kT * sizeof(int));
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
  int64_t* ty = reinterpret_cast<int64_t*>(take(kT * sizeof(int64_t)));
  int64_t* tx = reinterpret_cast<int64_t*>(take(kT * sizeof(int64_t)));
  int* treg = reinterpret_cast<int*>(take(kT * sizeof(int)));
  int* tpos = reinterpret_cast<int*>(take(kT * sizeof(int)));

  const int64_t nW = g.windows();
  const int64_t task = p.task0 + blockIdx.x;  // (b * nW + win) * heads + h
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
    // Other rows do reach the same entries from other lanes: order each row's updates before
    // the next row's.
    __syncwarp();
  }
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

}  // namespace

// Whether the tensor-core kernels cover these parameters on this device.
bool tensor_cores_cover(const WindowParams& p) {
  return p.d == tc::kD && p.geo.tokens() <= tc::kT && tensor_core_dtype_on_device(p.dtype);
}

// fp16 or bf16 (tensor_cores_cover() accepts no other dtype).
cudaError_t tc_attention_cuda(const WindowParams& p, bool backward, cudaStream_t stream) {
  const bool half = p.dtype == DType::Float16;
  if (backward) {
    const int table = static_cast<int>(p.geo.table_size());
    return half ? launch_per_window(backward_tc_kernel<__half>, p,
                                    tc::BwdSmem::bytes<__half>(table), stream)
                : launch_per_window(backward_tc_kernel<__nv_bfloat16>, p,
                                    tc::BwdSmem::bytes<__nv_bfloat16>(table), stream);
  }
  // Static shared memory only: no dynamic allowance.
  return half ? launch_per_window(forward_tc_kernel<__half>, p, 0, stream)
              : launch_per_window(forward_tc_kernel<__nv_bfloat16>, p, 0, stream);
}

}  // namespace window_attention
}  // namespace tokenmix
