// Runs the index math of the sparse-token gather family's CUDA kernels (gather_math.h) on the
// host, in the kernels' own loop order: the word choice of the row copies (row_word_bytes), their
// thread layout (row_tiling / row_slot, full tiles and the tail, with grids capped below the work
// so the grid-stride loops run), the shared-memory tiles of the inverse map (tile_offset), the
// index range check (index_in_range) and the staged-key ranks of topk (count_before, in chunks,
// with the early stop at k). Each is compared with its plain definition. Exit status 0 on success.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "ops/gather/gather_math.h"

namespace gt = tokenmix::gather;

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const char* what, long long a, long long b, long long c) {
  ++checks;
  if (!ok && failures++ < 20) std::printf("FAIL %s (%lld, %lld, %lld)\n", what, a, b, c);
}

// Largest of 16, 8, 4, 2, 1 dividing every value.
int widest_word(const std::vector<uint64_t>& v) {
  for (int w = 16; w > 1; w /= 2) {
    bool all = true;
    for (uint64_t x : v) all = all && x % w == 0;
    if (all) return w;
  }
  return 1;
}

void word_bytes_cases(std::mt19937_64& rng) {
  for (int i = 0; i < 20000; ++i) {
    const int n = 1 + static_cast<int>(rng() % 6);
    std::vector<uint64_t> v(n);
    for (auto& x : v) x = (rng() % 4096) << (rng() % 6);
    const int got = gt::row_word_bytes(v.data(), n);
    expect(got == widest_word(v), "row_word_bytes", got, widest_word(v), n);
  }
}

// The row-copy kernels' loops, for one batch row: grid (tiles, chunks) capped at gx, gz blocks.
void tiling_case(int64_t rows, int64_t words, int max_threads, int64_t gx, int64_t gz) {
  const gt::RowTiling g = gt::row_tiling(rows, words, max_threads);
  expect(g.tx >= 1 && g.ty >= 1 && g.tx * g.ty <= max_threads, "block size", g.tx, g.ty, words);
  std::vector<int> seen(static_cast<size_t>(rows * words), 0);
  const int64_t grid_x = std::min(std::max<int64_t>(g.tiles, 1), gx);
  const int64_t grid_z = std::min(std::max<int64_t>(g.chunks, 1), gz);
  const int64_t tile_rows = static_cast<int64_t>(g.ty) * gt::kRowsPerThread;
  bool in_range = true;
  auto touch = [&](int64_t row, int64_t w) {
    if (row < 0 || row >= rows || w < 0 || w >= words) {
      in_range = false;
      return;
    }
    ++seen[static_cast<size_t>(row * words + w)];
  };
  for (int64_t bx = 0; bx < grid_x; ++bx) {
    for (int64_t bz = 0; bz < grid_z; ++bz) {
      for (int t = 0; t < g.tx * g.ty; ++t) {
        const gt::RowSlot s = gt::row_slot(t, g.tx);
        for (int64_t c = bz; c < g.chunks; c += grid_z) {
          const int64_t w = c * g.tx + s.word;
          if (w >= words) continue;
          for (int64_t tile = bx; tile < g.tiles; tile += grid_x) {
            const int64_t k0 = tile * tile_rows + s.row;
            if (k0 + (gt::kRowsPerThread - 1) * g.ty < rows) {
              for (int u = 0; u < gt::kRowsPerThread; ++u) touch(k0 + u * g.ty, w);
            } else {
              for (int64_t k = k0; k < rows; k += g.ty) touch(k, w);
            }
          }
        }
      }
    }
  }
  expect(in_range, "tiling in range", rows, words, max_threads);
  int64_t wrong = 0;
  for (int x : seen) wrong += x != 1;
  expect(wrong == 0, "tiling covers each (row, word) once", rows, words, wrong);
}

void tiling_cases() {
  const int64_t word_counts[] = {1, 2, 3, 7, 24, 48, 96, 128, 130, 255, 256, 257, 600, 1000};
  for (int64_t rows = 0; rows <= 40; ++rows) {
    for (int64_t words : word_counts) tiling_case(rows, words, 256, INT32_MAX, 65535);
  }
  const int64_t big_rows[] = {137, 196, 197, 1023, 1024, 1025, 3000};
  for (int64_t rows : big_rows) {
    for (int64_t words : word_counts) {
      tiling_case(rows, words, 256, INT32_MAX, 65535);
      tiling_case(rows, words, 256, 3, 2);
      tiling_case(rows, words, 64, 1, 1);
    }
  }
  for (int t = 0; t < 1024; ++t) {
    for (int tx = 1; tx <= 256; ++tx) {
      const gt::RowSlot s = gt::row_slot(t, tx);
      if (s.row != t / tx || s.word != t % tx) expect(false, "row_slot", t, tx, s.row);
    }
  }
  ++checks;
}

void range_cases() {
  const int64_t big = std::numeric_limits<int64_t>::max();
  const int64_t small = std::numeric_limits<int64_t>::min();
  const int64_t Ns[] = {0, 1, 2, 197, INT32_MAX, big};
  const int64_t ns[] = {small, -2, -1, 0, 1, 2, 196, 197, INT32_MAX, big - 1, big};
  for (int64_t N : Ns) {
    for (int64_t n : ns) {
      expect(gt::index_in_range(n, N) == (n >= 0 && n < N), "index_in_range", n, N, 0);
    }
  }
}

// build_inverse_kernel's loops: blocks (x over position tiles capped at gx), each reading the
// whole index row in a shuffled order (the atomics' order is arbitrary).
void inverse_case(std::mt19937_64& rng, int64_t N, int64_t K, int tile, int64_t gx) {
  std::vector<int64_t> idx(static_cast<size_t>(K));
  for (auto& n : idx) n = static_cast<int64_t>(rng() % static_cast<uint64_t>(N));
  std::vector<int32_t> want_c(N, 0), want_f(N, gt::kNoEntry);
  for (int64_t k = 0; k < K; ++k) {
    if (want_c[idx[k]]++ == 0) want_f[idx[k]] = static_cast<int32_t>(k);
  }
  std::vector<int32_t> cnt(N, -1), fst(N, -1);
  const int64_t grid_x = std::min((N + tile - 1) / tile, gx);
  int64_t outside = 0;
  std::vector<int64_t> order(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) order[k] = k;
  for (int64_t bx = 0; bx < grid_x; ++bx) {
    for (int64_t n0 = bx * tile; n0 < N; n0 += grid_x * tile) {
      const int len = static_cast<int>(std::min<int64_t>(N - n0, tile));
      std::vector<int32_t> c(len, 0), f(len, gt::kNoEntry);
      std::shuffle(order.begin(), order.end(), rng);
      for (int64_t k : order) {
        const int64_t at = gt::tile_offset(idx[k], n0, len);
        if (at >= len) ++outside;
        if (at >= 0 && at < len) {
          ++c[at];
          f[at] = std::min(f[at], static_cast<int32_t>(k));
        }
      }
      for (int i = 0; i < len; ++i) {
        cnt[n0 + i] = c[i];
        fst[n0 + i] = f[i];
      }
    }
  }
  int64_t wrong = 0;
  for (int64_t n = 0; n < N; ++n) wrong += cnt[n] != want_c[n] || fst[n] != want_f[n];
  expect(wrong == 0 && outside == 0, "inverse tiles", N, K, tile);
}

void inverse_cases(std::mt19937_64& rng) {
  const int64_t Ns[] = {1, 2, 5, 197, 2048, 2049, 5000};
  const int tiles[] = {1, 3, 64, 2048};
  for (int64_t N : Ns) {
    for (int tile : tiles) {
      for (int64_t K : {int64_t{1}, N / 2 + 1, N, 2 * N + 3}) {
        if (N * K / tile > 4000000) continue;
        inverse_case(rng, N, K, tile, INT32_MAX);
        inverse_case(rng, N, K, tile, 2);
      }
    }
  }
}

double score_value(std::mt19937_64& rng) {
  switch (rng() % 10) {
    case 0:
      return std::numeric_limits<double>::quiet_NaN();
    case 1:
      return (rng() % 2) ? 0.0 : -0.0;
    case 2:
      return (rng() % 2) ? INFINITY : -INFINITY;
    case 3:
      return static_cast<double>(static_cast<int>(rng() % 5)) - 2.0;  // ties
    default:
      return std::ldexp(static_cast<double>(static_cast<int64_t>(rng() % 2000001) - 1000000), -10);
  }
}

// topk_index_kernel for one score row: keys staged `chunk` at a time, counting stopped at k.
void topk_case(std::mt19937_64& rng, int64_t M, int64_t k, int chunk) {
  std::vector<uint64_t> key(static_cast<size_t>(M));
  for (auto& x : key) x = gt::rank_key(score_value(rng));
  std::vector<int64_t> sorted(static_cast<size_t>(M));
  for (int64_t q = 0; q < M; ++q) sorted[q] = q;
  std::sort(sorted.begin(), sorted.end(), [&](int64_t a, int64_t b) {
    return gt::ranks_before(key[a], a, key[b], b);
  });
  std::vector<int64_t> out(static_cast<size_t>(k), -1);
  int64_t wrong = 0;
  for (int64_t pos = 0; pos < M; ++pos) {
    int64_t rank = 0;
    for (int64_t q0 = 0; q0 < M; q0 += chunk) {
      const int len = static_cast<int>(std::min<int64_t>(M - q0, chunk));
      if (rank < k) rank += gt::count_before(key.data() + q0, q0, len, key[pos], pos);
    }
    int64_t exact = 0;
    for (int64_t q = 0; q < M; ++q) exact += gt::ranks_before(key[q], q, key[pos], pos);
    wrong += exact < k ? rank != exact : rank < k;
    if (rank < k) {
      wrong += out[rank] != -1;
      out[rank] = pos;
    }
  }
  for (int64_t r = 0; r < k; ++r) wrong += out[r] != sorted[r];
  expect(wrong == 0, "topk staged ranks", M, k, chunk);
}

void topk_cases(std::mt19937_64& rng) {
  const int chunks[] = {1, 2, 3, 16, 64, 2048};
  const int64_t Ms[] = {0, 1, 2, 3, 7, 33, 196, 300};
  for (int64_t M : Ms) {
    for (int chunk : chunks) {
      for (int64_t k : {int64_t{0}, int64_t{1}, M / 2, (M * 7) / 10, M}) {
        if (k > M) continue;
        topk_case(rng, M, k, chunk);
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(14);
  word_bytes_cases(rng);
  tiling_cases();
  range_cases();
  inverse_cases(rng);
  topk_cases(rng);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
