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

}  // namespace

cudaError_t backward_reductions_cuda(const WindowParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
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
  });
}

}  // namespace window_attention
}  // namespace tokenmix
