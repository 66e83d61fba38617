// The deterministic reductions after the backward kernels of windowed attention. Each backward
// block leaves its bias-table gradient (and, for a global query, its window's dq) as a partial;
// these kernels sum the partials in a fixed order: the bias table in two levels (chunks of
// kDbiasChunk blocks, then the chunks: one level would leave a few hundred threads each reading
// thousands of partials one after another), the global query's dq in window order.

#include <cstdint>

#include "window_attention_cuda.cuh"

namespace tokenmix {
namespace window_attention {
namespace {

using namespace cu;

// Thread x of a 2-D grid and the grid's x extent, for the grid-stride loops over the contiguous
// dimension (the y dimension walks the other, so no flat index is ever divided).
__device__ __forceinline__ int64_t thread_x() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t threads_x() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// dbias, first level: chunks[chunk, h, r] = sum of the chunk's kDbiasChunk (image, window)
// blocks, in block order. y walks the chunks; x the heads * table entries of one block's partial,
// contiguous in the partials and in the chunks (coalesced reads, no division: entry e of block bw
// sits at part[bw * heads * table + e]).
// Occupancy: 256 threads, ~32 registers, no shared memory: 8 blocks (64 warps) per SM. Memory
// bound: each partial is read once (4 bytes for 1 add); 4 loads per thread in flight (unroll).
template <typename T>
__global__ void dbias_chunk_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  const int64_t entries = p.geo.table_size() * p.heads, blocks = p.B * p.geo.windows();
  const int64_t n_chunks = dbias_chunk_count(blocks);
  const A* part = static_cast<const A*>(p.dbias_partial);
  A* chunks = static_cast<A*>(p.dbias_chunks);
  for (int64_t chunk = blockIdx.y; chunk < n_chunks; chunk += gridDim.y) {
    const int64_t lo = chunk * kDbiasChunk;
    const int64_t hi = lo + kDbiasChunk < blocks ? lo + kDbiasChunk : blocks;
    // Rolled: its trip count would cost a 64-bit division, for a loop that runs about once.
#pragma unroll 1
    for (int64_t e = thread_x(); e < entries; e += threads_x()) {
      const A* src = part + lo * entries + e;
      A sum = 0;
#pragma unroll 4
      for (int64_t bw = lo; bw < hi; ++bw, src += entries) sum += *src;
      chunks[chunk * entries + e] = sum;
    }
  }
}

// dbias, second level: dbias[r, h] = sum of the chunks, in chunk order. y walks the heads, x the
// table rows (coalesced reads of the chunks). Occupancy as dbias_chunk_kernel; a few blocks only.
template <typename T>
__global__ void dbias_reduce_kernel(WindowParams p) {
  using A = typename AccOf<T>::type;
  const int64_t table = p.geo.table_size(), entries = table * p.heads;
  const int64_t n_chunks = dbias_chunk_count(p.B * p.geo.windows());
  const A* chunks = static_cast<const A*>(p.dbias_chunks);
  T* dbias = static_cast<T*>(p.dbias);
  for (int64_t h = blockIdx.y; h < p.heads; h += gridDim.y) {
#pragma unroll 1  // as in dbias_chunk_kernel
    for (int64_t r = thread_x(); r < table; r += threads_x()) {
      const A* src = chunks + h * table + r;
      A sum = 0;
#pragma unroll 4
      for (int64_t c = 0; c < n_chunks; ++c, src += entries) sum += *src;
      dbias[r * p.heads + h] = from_acc<T>(sum);
    }
  }
}

// Global query: dq[b, t, h, :] = sum over the image's windows, in window order. y walks the
// images, x an image's tokens * heads * d values, contiguous in the partials and in dq; with
// `vec` (the launcher checked alignment) kVec of them per thread through 16-byte loads.
// Occupancy: 256 threads, ~40 registers (10 KB per block), no shared memory: 6 blocks (48 warps)
// per SM. Memory bound: `windows` partials of 4 (8) bytes read per value written.
template <typename T>
__global__ void dq_reduce_kernel(WindowParams p, bool vec) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = 16 / sizeof(A);
  const int64_t nW = p.geo.windows(), per_image = p.geo.tokens() * p.heads * p.d;
  const A* part = static_cast<const A*>(p.dq_partial);
  T* dq = static_cast<T*>(p.dq);
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const A* src = part + b * nW * per_image;
    T* dst = dq + b * per_image;
    if (vec) {
      for (int64_t i = thread_x() * kVec; i < per_image; i += threads_x() * kVec) {
        A sum[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) sum[k] = 0;
#pragma unroll 4
        for (int64_t w = 0; w < nW; ++w) {
          const uint4 piece = *reinterpret_cast<const uint4*>(src + w * per_image + i);
#pragma unroll
          for (int k = 0; k < kVec; ++k) sum[k] += reinterpret_cast<const A*>(&piece)[k];
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) dst[i + k] = from_acc<T>(sum[k]);
      }
    } else {
      for (int64_t i = thread_x(); i < per_image; i += threads_x()) {
        A sum = 0;
#pragma unroll 4
        for (int64_t w = 0; w < nW; ++w) sum += src[w * per_image + i];
        dst[i] = from_acc<T>(sum);
      }
    }
  }
}

// A 2-D grid: x blocks of kThreads over `along` values, y over `across` (at most 65535; the
// kernels stride over the rest).
dim3 grid_2d(int64_t along, int64_t across) {
  const int64_t y = across < 65535 ? (across < 1 ? 1 : across) : 65535;
  return dim3(static_cast<unsigned>(blocks_for(along, kThreads)), static_cast<unsigned>(y));
}

}  // namespace

cudaError_t backward_reductions_cuda(const WindowParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    if (p.dbias_partial != nullptr) {
      const int64_t table = p.geo.table_size();
      const int64_t n_chunks = dbias_chunk_count(p.B * p.geo.windows());
      dbias_chunk_kernel<T>
          <<<grid_2d(table * p.heads, n_chunks), kThreads, 0, stream>>>(p);
      dbias_reduce_kernel<T><<<grid_2d(table, p.heads), kThreads, 0, stream>>>(p);
    }
    if (p.global_q) {
      constexpr int64_t kVec = 16 / sizeof(A);
      const int64_t per_image = p.geo.tokens() * p.heads * p.d;
      const bool vec = per_image % kVec == 0 && reinterpret_cast<uintptr_t>(p.dq_partial) % 16 == 0;
      dq_reduce_kernel<T>
          <<<grid_2d(vec ? per_image / kVec : per_image, p.B), kThreads, 0, stream>>>(p, vec);
    }
  });
}

}  // namespace window_attention
}  // namespace tokenmix
