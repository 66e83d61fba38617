// Index math and formulas of the sparse-token gather family, shared by the CPU kernels and the
// CUDA kernels so that the CPU tests exercise exactly what the GPU runs. No torch headers.
#pragma once

#include <cstdint>
#include <cstring>

#include "tokenmix/macros.h"

namespace tokenmix {
namespace gather {

// Inverse map of one index row index[b, :] over the N source positions:
//   count[b, n] = #{k : index[b, k] == n},  first[b, n] = min{k : index[b, k] == n}.
// The CPU builds it with one serial pass per batch row, CUDA with atomicAdd/atomicMin; both are
// order-independent, so the two maps are bit-identical and so is everything computed from them.
// kNoEntry is larger than any valid k.
constexpr int32_t kNoEntry = 0x7f7f7f7f;

// How one output row [b, n, :] of a [B, N, C] result is produced from the inverse map.
enum class RowMode : int {
  GatherBackward,   // grad_x[b, n] = sum_{k: index[b,k]==n} grad_out[b, k]
  Scatter,          // out[b, n] = src[b, first] if n is replaced, else x[b, n]
  ScatterBackward,  // grad_x[b, n] = 0 if n is replaced, else grad_out[b, n]
};

enum class RowSource : int {
  Zero,   // write zeros
  Self,   // copy row n of the [B, N, C] operand
  First,  // copy row `first` of the [B, K, C] operand
  Sum,    // add rows k >= first of the [B, K, C] operand with index[b, k] == n, in k order
};

TM_HOST_DEVICE RowSource row_source(RowMode mode, int32_t count) {
  switch (mode) {
    case RowMode::GatherBackward:
      return count == 0 ? RowSource::Zero : (count == 1 ? RowSource::First : RowSource::Sum);
    case RowMode::Scatter:
      return count == 0 ? RowSource::Self : RowSource::First;
    case RowMode::ScatterBackward:
    default:
      return count == 0 ? RowSource::Self : RowSource::Zero;
  }
}

// topk_tokens' order: descending score, NaN above every number, ties (and NaNs, and -0 with +0)
// by lower position. rank_key() maps a score to an integer whose ascending order is that order,
// so (key, position) pairs compare as plain integers: a strict total order with which the CPU
// partial sort and the CUDA rank count (rank = number of candidates ordered before this one)
// select the same tokens in the same order. Every supported dtype converts to double exactly.
TM_HOST_DEVICE uint64_t rank_key(double score) {
  if (score != score) {
    return 0;
  }
  if (score == 0.0) {
    score = 0.0;
  }
#if defined(__CUDA_ARCH__)
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(score));
#else
  uint64_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
#endif
  constexpr uint64_t kSign = uint64_t{1} << 63;
  const uint64_t ascending = (bits & kSign) ? ~bits : (bits | kSign);
  return ~ascending;  // never 0: that would be the pattern of a NaN
}

TM_HOST_DEVICE bool ranks_before(uint64_t key_a, int64_t pos_a, uint64_t key_b, int64_t pos_b) {
  return key_a < key_b || (key_a == key_b && pos_a < pos_b);
}

// policy_softmax, one row i of logits l[0..N) with policy P[0..N):
//   m = max_j l_j,  e_j = exp(l_j - m),  w_j = P_j (j != i), 1 (j == i),  a_j = e_j w_j,
//   S = sum_j a_j,  D = S + eps,  out_j = (a_j + eps/N) / D.
// Backward, with g = dL/dout:
//   r = sum_j g_j out_j,  ga_j = (g_j - r) / D                    (dL/da_j)
//   dl_j = ga_j a_j - [j == argmax] * sum_k ga_k a_k              (m is a function of l, as in the
//                                                                   eager formula's torch.max)
//   dP_j += ga_j e_j  for j != i                                   (w_ii = P + (1 - P) = 1)
//   sum_k ga_k a_k = (sum_k g_k a_k - r S) / D.
template <typename A>
TM_HOST_DEVICE A policy_weight(A p, bool diagonal) {
  return diagonal ? A(1) : p;
}

template <typename A>
TM_HOST_DEVICE A policy_out(A a, A eps_over_n, A denom) {
  return (a + eps_over_n) / denom;
}

template <typename A>
TM_HOST_DEVICE A policy_grad_a(A g, A r, A denom) {
  return (g - r) / denom;
}

// sum_k ga_k a_k from the row sums sum_g_a = sum_k g_k a_k and sum_a = S.
template <typename A>
TM_HOST_DEVICE A policy_max_grad(A sum_g_a, A r, A sum_a, A denom) {
  return (sum_g_a - r * sum_a) / denom;
}

// Rows of one (b, h) slice handled by one backward task. Fixed (never derived from the thread
// count), so the partial policy gradients, and their fixed-order sum, are the same on any machine.
constexpr int64_t kPolicyRowsPerChunk = 32;

// Row chunks of one (b, h) slice of N rows: the backward's tasks, and the chunk axis of its
// partial policy gradients [B, H, chunks, N].
TM_HOST_DEVICE int64_t policy_chunks(int64_t N) {
  return (N + kPolicyRowsPerChunk - 1) / kPolicyRowsPerChunk;
}

// Rows [i0, i0 + rows) of chunk c of a slice of N rows (0 <= c < policy_chunks(N), so rows >= 1).
struct PolicyTile {
  int64_t i0;
  int rows;
};

TM_HOST_DEVICE PolicyTile policy_tile(int64_t chunk, int64_t N) {
  const int64_t i0 = chunk * kPolicyRowsPerChunk;
  const int64_t left = N - i0;
  return PolicyTile{i0, static_cast<int>(left < kPolicyRowsPerChunk ? left : kPolicyRowsPerChunk)};
}

// Offset of element [b, h, i, j] of a [B, H, N, N] tensor, bh = b * H + h.
TM_HOST_DEVICE int64_t policy_elem_at(int64_t bh, int64_t N, int64_t i, int64_t j) {
  return (bh * N + i) * N + j;
}

// Offset of partial[b, h, chunk, j] in the [B, H, chunks, N] buffer, bh = b * H + h. The reduce
// reads batch b's H * chunks partials of column j at b * H * chunks * N + j + c * N, c = h * chunks
// + chunk: the same offsets, in (h, chunk) order.
TM_HOST_DEVICE int64_t policy_partial_at(int64_t bh, int64_t chunks, int64_t chunk, int64_t N,
                                         int64_t j) {
  return (bh * chunks + chunk) * N + j;
}

// ---- CUDA launch geometry (index math of gather_cuda.cu; the CPU path does not use it) -------

// Widest word (16, 8, 4, 2 or 1 bytes) dividing every value: the base addresses, byte strides
// and the row size of a row copy, so that every word of every row is an aligned access.
TM_HOST_DEVICE int row_word_bytes(const uint64_t* values, int n) {
  int w = 16;
  for (int i = 0; i < n; ++i) {
    while (w > 1 && values[i] % static_cast<uint64_t>(w) != 0) w /= 2;
  }
  return w;
}

// Rows each thread of a row-copy kernel moves; all their loads are issued before the first store.
constexpr int kRowsPerThread = 4;

// Thread layout of the row-copy kernels over the `rows` rows of `words` words of one batch row
// (grid: x = row tiles, y = batch rows, z = word chunks). A block has tx * ty threads; thread t
// owns word slot.word of its chunk (of tx words) and, in tile i, the rows
// i * ty * kRowsPerThread + slot.row + u * ty for u < kRowsPerThread, so every (row, word) pair
// has exactly one owner and the loop index needs no division.
struct RowTiling {
  int tx, ty;
  int64_t tiles, chunks;
};

TM_HOST_DEVICE RowTiling row_tiling(int64_t rows, int64_t words, int max_threads) {
  RowTiling g{};
  g.tx = words < max_threads ? static_cast<int>(words < 1 ? 1 : words) : max_threads;
  g.ty = max_threads / g.tx;
  const int64_t per_tile = static_cast<int64_t>(g.ty) * kRowsPerThread;
  g.tiles = (rows + per_tile - 1) / per_tile;
  g.chunks = (words + g.tx - 1) / g.tx;
  return g;
}

// Thread t's row in a pass and word in a chunk: the one division of a row-copy thread (32-bit:
// t < 1024).
struct RowSlot {
  int row, word;
};

TM_HOST_DEVICE RowSlot row_slot(int t, int tx) {
  const int row = t / tx;
  return RowSlot{row, t - row * tx};
}

// Whether an index entry names one of N positions (N >= 0): one unsigned compare, negative
// entries wrapping to values above any N.
TM_HOST_DEVICE bool index_in_range(int64_t n, int64_t N) {
  return static_cast<uint64_t>(n) < static_cast<uint64_t>(N);
}

// The inverse-map kernel builds count/first of the positions [n0, n0 + len) of one batch row per
// block pass in shared memory; an index entry n lands at offset n - n0 of that tile, or nowhere.
TM_HOST_DEVICE int64_t tile_offset(int64_t n, int64_t n0, int64_t len) {
  return n >= n0 && n < n0 + len ? n - n0 : -1;
}

// topk on CUDA stages the keys of one score row in shared memory, `len` at a time (positions
// q0 .. q0 + len), and adds up, per candidate (key, pos), the staged candidates ordered before it
// by ranks_before: those before pos with key_q <= key, those after pos with key_q < key. The
// positional compare is folded into the loop bounds.
TM_HOST_DEVICE int count_before(const uint64_t* keys, int64_t q0, int len, uint64_t key,
                                int64_t pos) {
  const int64_t rel = pos - q0;
  const int lo = rel < 0 ? 0 : (rel > len ? len : static_cast<int>(rel));
  const int hi = rel + 1 < 0 ? 0 : (rel + 1 > len ? len : static_cast<int>(rel + 1));
  int rank = 0;
  for (int q = 0; q < lo; ++q) rank += keys[q] <= key ? 1 : 0;
  for (int q = hi; q < len; ++q) rank += keys[q] < key ? 1 : 0;
  return rank;
}

}  // namespace gather
}  // namespace tokenmix
