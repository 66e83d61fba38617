// CUDA kernels of deformable convolution (DCNv1/v2, torchvision semantics). Sampling math is
// deform_conv2d_math.h, shared with the CPU kernels and the host-side emulation the tests run.
//
// fused forward (fp16/bf16): sampling feeds tensor-core tiles in shared memory directly; see the
//   banner of fused_forward_kernel.
// The other kernels do the bilinear sampling around the channel-mixing GEMMs, which the launcher
// runs through ATen (cuBLAS) on a bounded chunk of images (fp32, fp64, and every backward):
//
// im2col: one thread per (image, offset group, tap, output pixel) and run of up to 16 of the
//   group's channels (SampleItem, deform_conv2d_math.h): the offsets, mask and corners are read and
//   computed once per run; consecutive threads take consecutive pixels, so offset, mask and column
//   accesses coalesce.
// col2im: the same threads scatter grad_cols to the four neighbours with atomic adds into an
//   accumulation-type buffer (order-dependent rounding: the CUDA backward is not bit-reproducible;
//   the CPU one is).
// col2im_coord: one thread per (image, offset group, tap, pixel) sums over its group's channels:
//   the offset and mask gradients, deterministic.
//
// Index width: every kernel splits its flat work index with I = uint32_t when the launcher has
// checked that the range fits in 31 bits, and with int64_t otherwise (the *_as / divmod helpers of
// deform_conv2d_math.h); the addresses built from the split parts are always 64-bit. The gathers
// are 2-byte (4- or 8-byte for fp32/fp64) loads by nature: the four corners of a sample are in one
// channel plane, at data-dependent positions, and consecutive channels are a plane apart. What the
// kernels do instead is keep several of them in flight: each thread loads the corners of
// kChanBatch channels (fused: of its whole run of kRun channels) before using any of them.

#include <mma.h>
#include <cstdint>

#include "deform_conv2d_params.h"
#include "tokenmix/cuda_common.cuh"

namespace tokenmix {
namespace deform_conv2d {
namespace {

using namespace cu;

constexpr int64_t kMax31 = 0x7fffffff;

// Sample position and modulation of tap `tap` of offset group `go` at output pixel `pix`; the
// pixel and tap are split in I.
template <typename T, typename A, typename I>
__device__ __forceinline__ void position(const DeformParams& p, int64_t b, int64_t go, int64_t tap,
                                         int64_t pix, A* y, A* x, A* m) {
  const Geometry& g = p.geo;
  const int64_t P = g.Ho * g.Wo;
  const int64_t ch = offset_channel(p.G, g.taps(), b, go, tap);
  const DivMod<I> o = divmod<I>(static_cast<I>(pix), static_cast<I>(g.Wo));
  const DivMod<I> k = divmod<I>(static_cast<I>(tap), static_cast<I>(g.kw));
  const T* off = static_cast<const T*>(p.offset);
  *y = static_cast<A>(origin_y(g, static_cast<int64_t>(o.q), static_cast<int64_t>(k.q))) +
       to_acc(off[(2 * ch) * P + pix]);
  *x = static_cast<A>(origin_x(g, static_cast<int64_t>(o.r), static_cast<int64_t>(k.r))) +
       to_acc(off[(2 * ch + 1) * P + pix]);
  *m = p.mask != nullptr ? to_acc(static_cast<const T*>(p.mask)[ch * P + pix]) : A(1);
}

// Channels per sampling work item: the position, offsets, mask and corners are computed once for
// this many columns, and there are still enough items to fill the GPU at small batches.
constexpr int64_t kChansPerItem = 16;
// Channels whose corner loads a sampling thread issues together before using the first.
constexpr int kChanBatch = 4;

// Whether the sampling kernels may split their work index in 32 bits.
bool narrow_items(const DeformParams& p, int64_t items) { return items <= kMax31 && p.Cin <= kMax31; }

// Calls body(item, image, corners, modulation) for every sampling work item of the chunk that
// this thread owns (grid-stride), with the item's sample position resolved once.
template <typename T, typename A, typename I, typename Body>
__device__ __forceinline__ void for_each_sample(const DeformParams& p, const Body& body) {
  const Geometry& g = p.geo;
  const int64_t P = g.Ho * g.Wo, kk = g.taps();
  const int64_t Cg = static_cast<int64_t>(static_cast<I>(p.Cin) / static_cast<I>(p.G));
  const int64_t total = sample_items(p.nb, p.G, Cg, kChansPerItem, kk, P);
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const SampleItem it = sample_item_as<I>(static_cast<I>(p.G), static_cast<I>(Cg), static_cast<I>(kChansPerItem),
                                            static_cast<I>(kk), static_cast<I>(P), static_cast<I>(t));
    const int64_t b = p.b0 + it.b;
    A y, x, m;
    position<T, A, I>(p, b, it.go, it.tap, it.pix, &y, &x, &m);
    body(it, b, corners(y, x, g.H, g.W, true), m);
  }
}

// The four corner values of a sample in channel plane `plane` (0 where a corner is invalid or
// `ok` is false), loaded before any is used.
template <typename T, typename A>
__device__ __forceinline__ void gather4(const T* plane, const Corners<A>& cn, bool ok, A v[4]) {
  TM_UNROLL
  for (int k = 0; k < 4; ++k) v[k] = ok && cn.valid[k] ? to_acc(plane[cn.idx[k]]) : A(0);
}

// The masked bilinear sample from its corner values, summed in the corners' order as torchvision
// does; invalid corners add nothing (not even 0 * a non-finite value).
template <typename A>
__device__ __forceinline__ A blend(const bool valid[4], const A w[4], const A v[4], A m) {
  A val = 0;
  TM_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (valid[k]) val += w[k] * v[k];
  }
  return val * m;
}

// im2col: see the file banner. Occupancy (sm_90, 32-bit split): 256 threads, no shared memory;
// ptxas 64 registers (fp16/bf16/fp32) -> 65536 / (64 * 256) = 4 blocks = 32 warps / SM (50 %),
// fp64 76 -> 3 blocks (37 %). Latency-bound: a dependent chain (offsets -> corners -> gathers) and
// no arithmetic to speak of (per column 4 gathered elements, mostly L1/L2 hits, ~8 FLOPs and one
// store); each thread keeps the 4 x kChanBatch = 16 gathers of a batch in flight.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) im2col_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const int64_t HW = p.geo.H * p.geo.W, P = p.geo.Ho * p.geo.Wo, kk = p.geo.taps(), col_step = kk * P;
  const T* input = static_cast<const T*>(p.input);
  T* cols = static_cast<T*>(p.cols);
  for_each_sample<T, A, I>(p, [&](const SampleItem& it, int64_t b, const Corners<A>& cn, A m) {
    const T* plane = input + (b * p.Cin + it.c_lo) * HW;
    T* col = cols + column_index(p.Cin, kk, P, it.b, it.c_lo, it.tap, it.pix);
    const int n = static_cast<int>(it.c_hi - it.c_lo);
    for (int c0 = 0; c0 < n; c0 += kChanBatch) {
      A v[kChanBatch][4];
      TM_UNROLL
      for (int j = 0; j < kChanBatch; ++j) gather4(plane + (c0 + j < n ? (c0 + j) * HW : 0), cn, c0 + j < n, v[j]);
      TM_UNROLL
      for (int j = 0; j < kChanBatch; ++j) {
        if (c0 + j < n) col[(c0 + j) * col_step] = from_acc<T>(blend(cn.valid, cn.w, v[j], m));
      }
    }
  });
}

namespace fused {
using IG = ImplicitGemm;
constexpr int BM = IG::BM, BK = IG::BK, kRun = IG::kRun, kThreadsF = IG::kThreads;
constexpr int kLdA = BM + 8;  // As[k][m]; padded rows keep WMMA's 32-byte alignment
constexpr int kLdB = BK + 8;  // Bs[n][k]; 80-byte rows keep cp.async's 16-byte alignment
constexpr int kLdC = BM + 4;  // Cs[n][m], fp32
static_assert(kThreadsF % BM == 0 && BK % kRun == 0, "thread slots must tile the chunk");

template <int BN>
struct Layout {
  // Two stages of A and B (2-byte elements); the fp32 C tile reuses the same bytes afterwards.
  static constexpr int kElemsA = BK * kLdA, kElemsB = BN * kLdB;
  static constexpr int kBytesAB = 2 * (kElemsA + kElemsB) * 2;
  static constexpr int kBytesC = BN * kLdC * 4;
  static constexpr int kBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;
  static constexpr int kWarpsM = 2, kWarpRows = BM / kWarpsM, kWarpCols = BN / (kThreadsF / kWarp / kWarpsM);
  static constexpr int kFragsM = kWarpRows / 16, kFragsN = kWarpCols / 16;
  static_assert(kFragsM * 16 * kWarpsM == BM && kFragsN * 16 * (kThreadsF / kWarp / kWarpsM) == BN,
                "warps must tile the block");
  static_assert(FusedTile<BN>::kSegsPerThread * kThreadsF == BN * FusedTile<BN>::kSegs, "segments must tile B");
};

// Launch constants, narrowed on the host (deform_forward_fused_supported checks the ranges).
struct Args {
  uint32_t K, Cin, Cg, kk, kw, Wo;
  bool b_vec;  // Wt rows are 16-byte aligned (K % 8 == 0, aligned base): B staged by cp.async
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Stages the BN x BK slice of Wt at columns [k0, k0 + BK) into Bs (zeros outside [0, N) x [0, K)):
// 16-byte cp.async segments when the rows are aligned, 2-byte loads otherwise.
template <typename T, int BN>
__device__ __forceinline__ void stage_b(T* Bs, const T* wt, int64_t n0, int64_t N, uint32_t K, uint32_t k0,
                                        bool vec, int t) {
  using Tile = FusedTile<BN>;
  if (vec) {
    TM_UNROLL
    for (int s = 0; s < Tile::kSegsPerThread; ++s) {
      const int seg = t + s * kThreadsF, n = Tile::seg_row(seg), kc = Tile::seg_col(seg);
      const bool ok = n0 + n < N && k0 + kc < K;
      cp_async16(Bs + n * kLdB + kc, ok ? wt + (n0 + n) * K + k0 + kc : wt, ok);
    }
  } else {
    TM_NO_UNROLL
    for (int i = t; i < BN * BK; i += kThreadsF) {
      const int n = i / BK, kl = i % BK;
      const bool ok = n0 + n < N && k0 + kl < K;
      Bs[n * kLdB + kl] = ok ? wt[(n0 + n) * K + k0 + kl] : from_acc<T>(0.0f);
    }
  }
}

// One thread's A run across the K walk. With kShared (Cg % kRun == 0) the run's kRun columns share
// one sample position: its corners are kept while the offset key (group, tap) stays the same, the
// 4 x kRun corner loads of the run are all issued before the first is used, and the offsets of the
// next chunk, when its key differs, are loaded while this chunk is computed. Otherwise each column
// is sampled on its own in ColumnWalk32 order (the original schedule, for small or odd group sizes).
template <typename T, bool kShared>
struct ARun {
  const T* img;   // input image b
  const T* offr;  // offset + image b's first offset row + pix
  const T* mskr;  // mask likewise, or null
  uint32_t HW, P;  // < 2^31 (host-checked); products with them are formed in 64 bits
  uint32_t oy, ox;
  bool row_ok;

  int32_t base;  // kShared: corner_base() of the current key's corners (H * W < 2^31)
  float w[4], mod;
  bool valid[4];
  uint32_t key, pf_key;
  T pf_dy, pf_dx, pf_m;

  __device__ __forceinline__ void load_offsets(uint32_t k, T* dy, T* dx, T* m) const {
    *dy = offr[(2 * static_cast<uint64_t>(k)) * P];
    *dx = offr[(2 * static_cast<uint64_t>(k) + 1) * P];
    *m = mskr != nullptr ? mskr[static_cast<uint64_t>(k) * P] : from_acc<T>(1.0f);
  }

  __device__ __forceinline__ Corners<float> place(const Args& a, const Geometry& g, uint32_t tap, T dy, T dx) const {
    const DivMod<uint32_t> kt = divmod<uint32_t>(tap, a.kw);
    const float y = static_cast<float>(origin_y(g, oy, kt.q)) + to_acc(dy);
    const float x = static_cast<float>(origin_x(g, ox, kt.r)) + to_acc(dx);
    return corners(y, x, g.H, g.W, true);
  }

  // Samples the run of columns [kc, kc + kRun) into slots [a_col, a_col + kRun) of row a_row of As.
  __device__ __forceinline__ void sample(const Args& a, const Geometry& g, uint32_t kc, T* As, int a_row,
                                         int a_col) {
    T out[kRun];
    if constexpr (kShared) {
      const bool live = row_ok && kc < a.K;
      if (live) {
        const RunColumns rc = run_columns(kc, a.Cin, a.Cg, a.kk);
        if (rc.key != key) {
          T dy, dx, m;
          if (rc.key == pf_key) {
            dy = pf_dy;
            dx = pf_dx;
            m = pf_m;
          } else {
            load_offsets(rc.key, &dy, &dx, &m);
          }
          key = rc.key;
          const Corners<float> cn = place(a, g, rc.tap, dy, dx);
          mod = mskr != nullptr ? to_acc(m) : 1.0f;
          base = static_cast<int32_t>(corner_base(cn, g.W));
          TM_UNROLL
          for (int k = 0; k < 4; ++k) {
            w[k] = cn.w[k];
            valid[k] = cn.valid[k];
          }
        }
        // Corner k of channel c + r is element (c + r) * HW + base + (k / 2) * W + k % 2 of the image.
        const int64_t at = static_cast<int64_t>(static_cast<uint64_t>(rc.c) * HW) + base;
        T raw[kRun][4];
        TM_UNROLL
        for (int r = 0; r < kRun; ++r) {
          const T* q0 = img + (at + static_cast<int64_t>(r) * HW);
          const T* q1 = q0 + g.W;
          raw[r][0] = valid[0] ? __ldg(q0) : from_acc<T>(0.0f);
          raw[r][1] = valid[1] ? __ldg(q0 + 1) : from_acc<T>(0.0f);
          raw[r][2] = valid[2] ? __ldg(q1) : from_acc<T>(0.0f);
          raw[r][3] = valid[3] ? __ldg(q1 + 1) : from_acc<T>(0.0f);
        }
        if (kc + BK < a.K) {
          const RunColumns nx = run_columns(kc + BK, a.Cin, a.Cg, a.kk);
          if (nx.key != key && nx.key != pf_key) {
            pf_key = nx.key;
            load_offsets(nx.key, &pf_dy, &pf_dx, &pf_m);
          }
        }
        TM_UNROLL
        for (int r = 0; r < kRun; ++r) {
          float c4[4];
          TM_UNROLL
          for (int k = 0; k < 4; ++k) c4[k] = to_acc(raw[r][k]);
          out[r] = from_acc<T>(blend(valid, w, c4, mod));
        }
      } else {
        TM_UNROLL
        for (int r = 0; r < kRun; ++r) out[r] = from_acc<T>(0.0f);
      }
    } else {
      ColumnWalk32 col(kc, a.Cin, a.Cg);
      Corners<float> cn{};
      float m = 0;
      TM_UNROLL
      for (int r = 0; r < kRun; ++r, col.next()) {
        float v = 0.0f;
        if (row_ok && col.k < a.K) {
          if (col.fresh) {
            T dy, dx, mt;
            load_offsets(col.go * a.kk + col.tap, &dy, &dx, &mt);
            cn = place(a, g, col.tap, dy, dx);
            m = mskr != nullptr ? to_acc(mt) : 1.0f;
          }
          float c4[4];
          gather4(img + static_cast<uint64_t>(col.c) * HW, cn, true, c4);
          v = blend(cn.valid, cn.w, c4, m);
        }
        out[r] = from_acc<T>(v);
      }
    }
    TM_UNROLL
    for (int r = 0; r < kRun; ++r) As[(a_col + r) * kLdA + a_row] = out[r];
  }
};
}  // namespace fused

// Fused forward: the implicit GEMM of ImplicitGemm (deform_conv2d_math.h) on tensor cores (WMMA,
// 16x16x16, fp32 accumulators), BM x BN tiles with BN = 64 when Cout <= 64 and 128 otherwise
// (FusedTile). Per K chunk of BK = 32 each thread samples its run of kRun = 8 columns of one row
// (ARun) into shared memory (column-major A, so the 64 threads of a column write consecutive
// addresses), the block stages the matching BN x BK slice of the tap-major weight (16-byte
// cp.async when aligned), and each of the 8 warps multiplies a 32 x BN/4 piece of the tile. Two
// smem stages and one barrier per chunk: the weight copy of chunk j + 1 runs during the MMAs of
// chunk j, and a warp's 32-load gathers of chunk j + 1 overlap the other warps' (and the other
// block's) MMAs of chunk j. The accumulators go through shared memory
// so the output is written with pixels fastest, as NCHW lays them out; the bias is staged in shared
// memory. Limits: fp16/bf16, one weight group, sm_80+ (bf16 fragments, cp.async), K, P and H * W
// below 2^31 (the launcher's predicate; larger problems take the unfused path).
// Occupancy (sm_90): 256 threads, launch bound (256, 2) -> ptxas 128 registers (the one-position
// form; 106-122 otherwise), no spills: 65536 / (128 * 256) = 2 blocks = 16 warps / SM (25 %),
// register-bound (3 blocks need <= 85 registers; the 32 corner values in flight, their 64-bit
// addresses and 16-32 accumulator registers do not fit). Shared memory 35.3 KB (BN 128) / 19.7 KB
// (BN 64) a block: 6 / 11 blocks' worth, not the limit. Per chunk a block gathers 64 x 32 samples
// (16 KB of 2-byte corner loads, mostly L1/L2 hits: neighbouring pixels share corners) and the
// BN x 32 weight slice (8 KB at BN 128, from L2) for 2 x 64 x BN x 32 FLOPs (524 KFLOP at BN 128):
// ~21 FLOP/B (13 at BN 64), far below the ~300 FLOP/B tensor-core ridge of an H100, so it is bound
// by the gathers' latency and load-issue rate, not by the tensor cores.
template <typename T, int BN, bool kShared>
__global__ void __launch_bounds__(ImplicitGemm::kThreads, 2) fused_forward_kernel(DeformParams p, fused::Args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using namespace fused;
  using L = Layout<BN>;
  using Tile = FusedTile<BN>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  __shared__ float bias_s[BN];
  T* As0 = reinterpret_cast<T*>(smem);
  T* Bs0 = As0 + 2 * L::kElemsA;
  float* Cs = reinterpret_cast<float*>(smem);

  const Geometry& g = p.geo;
  const int64_t P = g.Ho * g.Wo, N = p.Cout, M = p.nb * P;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int t = threadIdx.x, warp = t / kWarp;
  const int wm = (warp % L::kWarpsM) * L::kWarpRows, wn = (warp / L::kWarpsM) * L::kWarpCols;
  const T* wt = static_cast<const T*>(p.weight_tk);

  // This thread's A row (also its epilogue row): image and pixel split once for the whole K walk.
  const int a_row = IG::a_row(t), a_col = IG::a_col(t);
  const int64_t m = m0 + a_row;
  ARun<T, kShared> run;
  run.row_ok = m < M;
  const DivMod<int64_t> bp = divmod<int64_t>(run.row_ok ? m : 0, P > 0 ? P : 1);
  const int64_t b = p.b0 + bp.q, pix = bp.r;
  const DivMod<uint32_t> oyx = divmod<uint32_t>(static_cast<uint32_t>(pix), a.Wo);
  run.oy = oyx.q;
  run.ox = oyx.r;
  run.HW = static_cast<uint32_t>(g.H * g.W);
  run.P = static_cast<uint32_t>(P);
  run.img = static_cast<const T*>(p.input) + b * p.Cin * (g.H * g.W);
  const int64_t offs = static_cast<int64_t>(a.kk) * p.G;  // offset channels per image, halved
  run.offr = static_cast<const T*>(p.offset) + 2 * b * offs * P + pix;
  run.mskr = p.mask != nullptr ? static_cast<const T*>(p.mask) + b * offs * P + pix : nullptr;
  run.key = run.pf_key = 0xffffffffu;

  static_assert(BN <= kThreadsF, "one bias column per thread");
  const T* bias = static_cast<const T*>(p.bias);
  if (t < BN) bias_s[t] = bias != nullptr && n0 + t < N ? to_acc(bias[n0 + t]) : 0.0f;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[L::kFragsM][L::kFragsN];
  TM_UNROLL
  for (int i = 0; i < L::kFragsM; ++i) {
    TM_UNROLL
    for (int j = 0; j < L::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  stage_b<T, BN>(Bs0, wt, n0, N, a.K, 0, a.b_vec, t);
  cp_async_commit();
  int buf = 0;
  for (uint32_t k0 = 0; k0 < a.K; k0 += BK, buf ^= 1) {
    T* As = As0 + buf * L::kElemsA;
    const T* Bs = Bs0 + buf * L::kElemsB;
    run.sample(a, g, k0 + a_col, As, a_row, a_col);
    cp_async_wait_all();
    // Chunk k0's A and B are complete; every warp is past the MMAs of the previous chunk, so the
    // other stage is free for chunk k0 + BK, whose weight copy runs during these MMAs.
    __syncthreads();
    if (k0 + BK < a.K) {
      stage_b<T, BN>(Bs0 + (buf ^ 1) * L::kElemsB, wt, n0, N, a.K, k0 + BK, a.b_vec, t);
      cp_async_commit();
    }
    TM_UNROLL
    for (int kf = 0; kf < BK; kf += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[L::kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[L::kFragsN];
      TM_UNROLL
      for (int i = 0; i < L::kFragsM; ++i) wmma::load_matrix_sync(fa[i], As + kf * kLdA + wm + 16 * i, kLdA);
      TM_UNROLL
      for (int j = 0; j < L::kFragsN; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn + 16 * j) * kLdB + kf, kLdB);
      TM_UNROLL
      for (int i = 0; i < L::kFragsM; ++i) {
        TM_UNROLL
        for (int j = 0; j < L::kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  cp_async_wait_all();  // none pending unless K == 0, when the prologue's zero fill still is
  __syncthreads();      // the C tile overwrites both stages

  TM_UNROLL
  for (int i = 0; i < L::kFragsM; ++i) {
    TM_UNROLL
    for (int j = 0; j < L::kFragsN; ++j) {
      wmma::store_matrix_sync(Cs + (wn + 16 * j) * kLdC + wm + 16 * i, acc[i][j], kLdC, wmma::mem_col_major);
    }
  }
  __syncthreads();
  if (run.row_ok) {
    T* orow = static_cast<T*>(p.out) + out_row_base(b, N, P, pix);
    TM_UNROLL
    for (int s = 0; s < Tile::kColSteps; ++s) {
      const int n = t / BM + s * Tile::kColStep;
      if (n0 + n < N) orow[(n0 + n) * P] = from_acc<T>(Cs[n * kLdC + a_row] + bias_s[n]);
    }
  }
#else
  __trap();  // deform_forward_fused_supported() never selects this kernel below sm_80
#endif
}

// col2im: see the file banner. Occupancy (sm_90, 32-bit split): 256 threads, no shared memory;
// ptxas 48 registers (fp16/bf16/fp32) -> 65536 / (48 * 256) = 5 blocks = 40 warps / SM (62 %), fp64
// 64 -> 4 blocks (50 %). Bound by the atomics: 4 fp32/fp64 atomic adds per column (L2
// read-modify-write, 16-32 B) against one sizeof(T) grad_cols load; the kChanBatch grad_cols loads
// of a batch are issued together before its atomics.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) col2im_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const int64_t HW = p.geo.H * p.geo.W, P = p.geo.Ho * p.geo.Wo, kk = p.geo.taps(), col_step = kk * P;
  const T* grad_cols = static_cast<const T*>(p.grad_cols);
  A* grad_input = static_cast<A*>(p.grad_input);
  for_each_sample<T, A, I>(p, [&](const SampleItem& it, int64_t b, const Corners<A>& cn, A m) {
    A* plane = grad_input + (b * p.Cin + it.c_lo) * HW;
    const T* gcol = grad_cols + column_index(p.Cin, kk, P, it.b, it.c_lo, it.tap, it.pix);
    const int n = static_cast<int>(it.c_hi - it.c_lo);
    for (int c0 = 0; c0 < n; c0 += kChanBatch) {
      A gm[kChanBatch];
      TM_UNROLL
      for (int j = 0; j < kChanBatch; ++j) gm[j] = c0 + j < n ? to_acc(gcol[(c0 + j) * col_step]) * m : A(0);
      TM_UNROLL
      for (int j = 0; j < kChanBatch; ++j) {
        if (c0 + j >= n) continue;
        TM_UNROLL
        for (int k = 0; k < 4; ++k) {
          if (cn.valid[k]) atomicAdd(plane + (c0 + j) * HW + cn.idx[k], gm[j] * cn.w[k]);
        }
      }
    }
  });
}

// col2im_coord: see the file banner. Occupancy (sm_90, 32-bit split): 256 threads, no shared
// memory; ptxas 88-95 registers (fp16/bf16/fp32), 128 (fp64) -> 65536 / (96 * 256) = 2 blocks =
// 16 warps / SM (25 %): the 5 x kChanBatch = 20 loads each thread keeps in flight (a batch of
// channels' grad_cols entries and corners, summed afterwards in channel order) cost the third block
// (<= 85 registers spills), and buy 4x the loads in flight per warp. Latency-bound: per channel
// 5 loads (mostly L1/L2 hits) feed ~20 FLOPs.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) col2im_coord_kernel(DeformParams p) {
  using A = typename AccOf<T>::type;
  const Geometry& g = p.geo;
  const int64_t HW = g.H * g.W, P = g.Ho * g.Wo, kk = g.taps(), col_step = kk * P;
  const int64_t Cg = static_cast<int64_t>(static_cast<I>(p.Cin) / static_cast<I>(p.G));
  const int64_t total = p.nb * p.G * kk * P;
  const T* input = static_cast<const T*>(p.input);
  const T* grad_cols = static_cast<const T*>(p.grad_cols);
  T* grad_offset = static_cast<T*>(p.grad_offset);
  T* grad_mask = static_cast<T*>(p.grad_mask);
  for (int64_t t = global_thread(); t < total; t += thread_count()) {
    const CoordItem it = coord_item<I>(static_cast<I>(p.G), static_cast<I>(kk), static_cast<I>(P), static_cast<I>(t));
    const int64_t b = p.b0 + it.b;
    A y, x, m;
    position<T, A, I>(p, b, it.go, it.tap, it.pix, &y, &x, &m);
    const Corners<A> cf = corners(y, x, g.H, g.W, true);
    const Corners<A> cg = corners(y, x, g.H, g.W, false);
    const T* plane = input + (b * p.Cin + it.go * Cg) * HW;
    const T* gcol = grad_cols + column_index(p.Cin, kk, P, it.b, it.go * Cg, it.tap, it.pix);
    A gy = 0, gx = 0, gmask = 0;
    for (int64_t c0 = 0; c0 < Cg; c0 += kChanBatch) {
      A gc[kChanBatch], v[kChanBatch][4];
      TM_UNROLL
      for (int j = 0; j < kChanBatch; ++j) {
        const bool ok = c0 + j < Cg;
        gc[j] = ok ? to_acc(gcol[(c0 + j) * col_step]) : A(0);
        gather4(plane + (ok ? (c0 + j) * HW : 0), cg, ok, v[j]);
      }
      TM_UNROLL
      for (int j = 0; j < kChanBatch; ++j) {
        if (c0 + j >= Cg) continue;
        gmask += gc[j] * blend(cf.valid, cf.w, v[j], A(1));
        gy += gc[j] * m * grad_y(v[j], cg.lx);
        gx += gc[j] * m * grad_x(v[j], cg.ly);
      }
    }
    const int64_t ch = offset_channel(p.G, kk, b, it.go, it.tap);
    grad_offset[(2 * ch) * P + it.pix] = from_acc<T>(gy);
    grad_offset[(2 * ch + 1) * P + it.pix] = from_acc<T>(gx);
    if (grad_mask != nullptr) grad_mask[ch * P + it.pix] = from_acc<T>(gmask);
  }
}

// Launches kernel<T, uint32_t> when the work index fits in 31 bits, kernel<T, int64_t> otherwise.
#define TM_DEFORM_LAUNCH(kernel, items, p, stream)                                        \
  dispatch_dtype((p).dtype, [&](auto tag) {                                               \
    using T = decltype(tag);                                                              \
    if (narrow_items(p, items)) {                                                         \
      kernel<T, uint32_t><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(p);       \
    } else {                                                                              \
      kernel<T, int64_t><<<blocks_for(items, kThreads), kThreads, 0, stream>>>(p);        \
    }                                                                                     \
  })

template <typename T, int BN>
void launch_fused_tile(const DeformParams& p, const fused::Args& a, unsigned rows, cudaStream_t stream) {
  const dim3 grid(rows, static_cast<unsigned>(FusedTile<BN>::col_blocks(p.Cout)));
  if (a.Cg % ImplicitGemm::kRun == 0) {
    fused_forward_kernel<T, BN, true><<<grid, ImplicitGemm::kThreads, 0, stream>>>(p, a);
  } else {
    fused_forward_kernel<T, BN, false><<<grid, ImplicitGemm::kThreads, 0, stream>>>(p, a);
  }
}

// The N tile from Cout: 64 wide when Cout <= 64, so no tensor-core work is spent on zero columns.
template <typename T>
void launch_fused(const DeformParams& p, const fused::Args& a, unsigned rows, cudaStream_t stream) {
  if (p.Cout <= 64) {
    launch_fused_tile<T, 64>(p, a, rows, stream);
  } else {
    launch_fused_tile<T, 128>(p, a, rows, stream);
  }
}

}  // namespace

cudaError_t deform_im2col_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total =
      sample_items(p.nb, p.G, p.Cin / p.G, kChansPerItem, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  return TM_DEFORM_LAUNCH(im2col_kernel, total, p, stream);
}

cudaError_t deform_col2im_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total =
      sample_items(p.nb, p.G, p.Cin / p.G, kChansPerItem, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  return TM_DEFORM_LAUNCH(col2im_kernel, total, p, stream);
}

bool deform_forward_fused_supported(const DeformParams& p, int64_t weight_groups) {
  // The grid is (row blocks, column blocks): gridDim.y is at most 65535, so more than 65535 * BN
  // output channels take the unfused path. The kernel splits K, pixels and plane offsets in 32 bits.
  const ImplicitGemm ig = ImplicitGemm::make(p.nb, p.Cin, p.Cout, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  return weight_groups == 1 && ig.row_blocks() <= kMax31 && ig.col_blocks() <= 65535 && ig.K <= kMax31 &&
         ig.P <= kMax31 && p.geo.H * p.geo.W <= kMax31 && cu::tensor_core_dtype_on_device(p.dtype);
}

cudaError_t deform_forward_fused_cuda(const DeformParams& p, cudaStream_t stream) {
  const ImplicitGemm ig = ImplicitGemm::make(p.nb, p.Cin, p.Cout, p.geo.taps(), p.geo.Ho * p.geo.Wo);
  if (ig.row_blocks() > kMax31 || ig.col_blocks() > 65535 || ig.K > kMax31 || ig.P > kMax31 ||
      p.geo.H * p.geo.W > kMax31) {
    return cudaErrorInvalidConfiguration;
  }
  const auto u32 = [](int64_t v) { return static_cast<uint32_t>(v); };
  const fused::Args a{u32(ig.K), u32(p.Cin), u32(p.Cin / p.G), u32(p.geo.taps()), u32(p.geo.kw), u32(p.geo.Wo),
                      ig.K % 8 == 0 && reinterpret_cast<uintptr_t>(p.weight_tk) % 16 == 0};
  switch (p.dtype) {
    case DType::Float16:
      launch_fused<__half>(p, a, static_cast<unsigned>(ig.row_blocks()), stream);
      break;
    case DType::BFloat16:
      launch_fused<__nv_bfloat16>(p, a, static_cast<unsigned>(ig.row_blocks()), stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t deform_col2im_coord_cuda(const DeformParams& p, cudaStream_t stream) {
  const int64_t total = p.nb * p.G * p.geo.taps() * p.geo.Ho * p.geo.Wo;
  return TM_DEFORM_LAUNCH(col2im_coord_kernel, total, p, stream);
}

#undef TM_DEFORM_LAUNCH

}  // namespace deform_conv2d
}  // namespace tokenmix
