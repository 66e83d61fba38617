// Runs the index math of the sparse-token gather family's CUDA kernels (gather_math.h) on the
// host, in the kernels' own loop order: the word choice of the row copies (row_word_bytes), their
// thread layout (row_tiling / row_slot, full tiles and the tail, with grids capped below the work
// so the grid-stride loops run), the shared-memory tiles of the inverse map (tile_offset), the
// index range check (index_in_range) and the staged-key ranks of topk (count_before, in chunks,
// with the early stop at k), and policy_softmax's forward, backward and policy-gradient reduce
// (policy_tile, policy_elem_at, policy_partial_at, the formulas, in double) against the chain
// rule of DynamicViT's softmax_with_policy. Each is compared with its plain definition. Exit
// status 0 on success.
#include <algorithm>
#include <climits>
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

// ---- policy_softmax ----------------------------------------------------------------------------
// gather_cuda.cu's launch constants: kThreads, kWarp, kPolicyBatch.
constexpr int kEmuThreads = 256, kEmuWarp = 32, kEmuBatch = 4;

int64_t grid_dim(int64_t n, int64_t limit) { return n < 1 ? 1 : std::min(n, limit); }

double max_nan(double a, double b) { return (b > a || b != b) ? b : a; }

struct PolicyCase {
  int64_t B, H, N;
  double eps;
  std::vector<double> l, g, P;  // [B, H, N, N], [B, H, N, N], [B, N]
};

PolicyCase policy_case(std::mt19937_64& rng, int64_t B, int64_t H, int64_t N, double eps,
                       bool ties) {
  PolicyCase c{B, H, N, eps, {}, {}, {}};
  std::normal_distribution<double> normal(0.0, 2.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  c.l.resize(static_cast<size_t>(B * H * N * N));
  c.g.resize(c.l.size());
  c.P.resize(static_cast<size_t>(B * N));
  for (auto& x : c.l) x = ties ? static_cast<double>(rng() % 3) : normal(rng);
  for (auto& x : c.g) x = normal(rng);
  for (auto& x : c.P) {
    const uint64_t k = rng() % 4;
    x = k == 0 ? 0.0 : (k == 1 ? 1.0 : unit(rng));
  }
  return c;
}

// DynamicViT's softmax_with_policy for row (bh, i): attn_policy = P + (1 - P) * eye, the
// max-subtracted exp weighted by it, normalised as (a + eps / N) / (sum a + eps).
struct RefRow {
  std::vector<double> e, w, a;
  double S, D;
  int64_t kstar;
};

RefRow ref_row(const PolicyCase& c, int64_t bh, int64_t i) {
  const int64_t N = c.N, b = bh / c.H;
  const double* l = &c.l[static_cast<size_t>((bh * N + i) * N)];
  RefRow r{std::vector<double>(N), std::vector<double>(N), std::vector<double>(N), 0, 0, 0};
  for (int64_t j = 1; j < N; ++j) r.kstar = l[j] > l[r.kstar] ? j : r.kstar;
  for (int64_t j = 0; j < N; ++j) {
    const double p = c.P[static_cast<size_t>(b * N + j)];
    r.w[j] = p + (1.0 - p) * (j == i ? 1.0 : 0.0);
    r.e[j] = std::exp(l[j] - l[r.kstar]);
    r.a[j] = r.e[j] * r.w[j];
    r.S += r.a[j];
  }
  r.D = r.S + c.eps;
  return r;
}

std::vector<double> ref_forward(const PolicyCase& c) {
  const int64_t N = c.N;
  std::vector<double> out(c.l.size());
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    for (int64_t i = 0; i < N; ++i) {
      const RefRow r = ref_row(c, bh, i);
      for (int64_t j = 0; j < N; ++j) out[(bh * N + i) * N + j] = (r.a[j] + c.eps / N) / r.D;
    }
  }
  return out;
}

// The chain rule through every out_j of every row, the max m attributed to its first position
// (torch.max's index): d a_j / d l_k = a_j ([j == k] - [k == k*]), d a_j / d P_k = [j == k] e_k
// for k != i (w_ii = P + 1 - P does not depend on P).
void ref_backward(const PolicyCase& c, std::vector<double>& dl, std::vector<double>& dP) {
  const int64_t N = c.N;
  dl.assign(c.l.size(), 0.0);
  dP.assign(c.P.size(), 0.0);
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    const int64_t b = bh / c.H;
    for (int64_t i = 0; i < N; ++i) {
      const RefRow r = ref_row(c, bh, i);
      const double* g = &c.g[static_cast<size_t>((bh * N + i) * N)];
      for (int64_t k = 0; k < N; ++k) {
        const double star = k == r.kstar ? 1.0 : 0.0;
        const double dS = r.a[k] - star * r.S;
        double sl = 0, sp = 0;
        for (int64_t j = 0; j < N; ++j) {
          const double da = r.a[j] * ((j == k ? 1.0 : 0.0) - star);
          const double out = (r.a[j] + c.eps / N) / r.D;
          sl += g[j] * (da / r.D - out / r.D * dS);
          sp += g[j] * ((j == k ? r.e[k] : 0.0) / r.D - out / r.D * r.e[k]);
        }
        dl[(bh * N + i) * N + k] = sl;
        if (k != i) dP[b * N + k] += sp;
      }
    }
  }
}

int64_t mismatches(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  double scale = 0;
  for (double x : want) scale = std::max(scale, std::fabs(x));
  int64_t bad = 0;
  for (size_t t = 0; t < got.size(); ++t) {
    const double d = std::fabs(got[t] - want[t]);
    bad += !(d <= tol * std::max(std::fabs(want[t]), 1e-6 * scale));
  }
  return bad;
}

// The reference itself against central differences of ref_forward (no ties: m is smooth there).
void reference_check(std::mt19937_64& rng) {
  PolicyCase c = policy_case(rng, 2, 2, 5, 1e-2, false);
  std::vector<double> dl, dP;
  ref_backward(c, dl, dP);
  auto loss = [&]() {
    const std::vector<double> out = ref_forward(c);
    double s = 0;
    for (size_t t = 0; t < out.size(); ++t) s += c.g[t] * out[t];
    return s;
  };
  const double h = 1e-6;
  int64_t bad = 0;
  auto diff = [&](double& x, double want) {
    const double x0 = x;
    x = x0 + h;
    const double up = loss();
    x = x0 - h;
    const double down = loss();
    x = x0;
    bad += !(std::fabs((up - down) / (2 * h) - want) <= 1e-6 * (1 + std::fabs(want)));
  };
  for (size_t t = 0; t < c.l.size(); ++t) diff(c.l[t], dl[t]);
  for (size_t t = 0; t < c.P.size(); ++t) diff(c.P[t], dP[t]);
  expect(bad == 0, "policy reference vs finite differences", c.N, bad, 0);
}

// policy_forward_kernel: a warp per row (b, h, i), grid (row tiles, H, B) capped at (gx, gy, gz).
void policy_forward_emulation(const PolicyCase& c, int64_t gx, int64_t gy, int64_t gz) {
  const int64_t N = c.N, warps = kEmuThreads / kEmuWarp;
  const int64_t grid_x = grid_dim((N + warps - 1) / warps, gx);
  const int64_t grid_y = grid_dim(c.H, gy), grid_z = grid_dim(c.B, gz);
  std::vector<double> out(c.l.size(), NAN);
  std::vector<int> writes(c.l.size(), 0);
  const double eps_n = c.eps / static_cast<double>(N);
  for (int64_t bz = 0; bz < grid_z; ++bz)
    for (int64_t by = 0; by < grid_y; ++by)
      for (int64_t bx = 0; bx < grid_x; ++bx)
        for (int64_t warp = 0; warp < warps; ++warp)
          for (int64_t b = bz; b < c.B; b += grid_z)
            for (int64_t h = by; h < c.H; h += grid_y)
              for (int64_t i = bx * warps + warp; i < N; i += grid_x * warps) {
                const int64_t row = (b * c.H + h) * N + i;
                const double* l = &c.l[static_cast<size_t>(row * N)];
                const double* P = &c.P[static_cast<size_t>(b * N)];
                double m = -INFINITY, s = 0;
                for (int lane = 0; lane < kEmuWarp; ++lane)
                  for (int64_t j = lane; j < N; j += kEmuWarp) m = max_nan(m, l[j]);
                for (int lane = 0; lane < kEmuWarp; ++lane)
                  for (int64_t j = lane; j < N; j += kEmuWarp)
                    s += std::exp(l[j] - m) * gt::policy_weight(P[j], j == i);
                const double denom = s + c.eps;
                for (int lane = 0; lane < kEmuWarp; ++lane)
                  for (int64_t j = lane; j < N; j += kEmuWarp) {
                    const double a = std::exp(l[j] - m) * gt::policy_weight(P[j], j == i);
                    out[row * N + j] = gt::policy_out(a, eps_n, denom);
                    ++writes[row * N + j];
                  }
              }
  int64_t wrong = 0;
  for (int x : writes) wrong += x != 1;
  expect(wrong == 0, "policy forward covers each element once", N, gx, wrong);
  const int64_t bad = mismatches(out, ref_forward(c), 1e-9);
  expect(bad == 0, "policy forward vs reference", c.B * 1000 + c.H, N, bad);
}

// policy_backward_kernel then policy_reduce_kernel, grids capped at (gx, gy, gz): per block and
// tile, the row statistics one row per warp into the shared arrays, then each thread's columns
// j walking the tile's rows kEmuBatch at a time; the reduce summing partial[b, :, :, j] in
// (h, chunk) order. Checks every index against its plain definition and the result against
// ref_backward.
void policy_backward_emulation(const PolicyCase& c, int64_t gx, int64_t gy, int64_t gz) {
  const int64_t B = c.B, H = c.H, N = c.N, R = gt::kPolicyRowsPerChunk;
  const int warps = kEmuThreads / kEmuWarp;
  const int64_t chunks = gt::policy_chunks(N);
  const int64_t grid_x = grid_dim(chunks, gx), grid_y = grid_dim(H, gy), grid_z = grid_dim(B, gz);
  const double eps_n = c.eps / static_cast<double>(N);
  const size_t elems = c.l.size(), parts = static_cast<size_t>(B * H * chunks * N);
  std::vector<double> dl(elems, NAN), partial(parts, NAN), dP(c.P.size(), NAN);
  std::vector<int> dl_writes(elems, 0), loads(elems, 0), stats(static_cast<size_t>(B * H * N), 0);
  std::vector<int> part_writes(parts, 0), part_reads(parts, 0), dp_writes(c.P.size(), 0);
  int64_t bad_index = 0, bad_order = 0, bad_tile = 0;
  expect(chunks * R >= N && (chunks - 1) * R < N, "policy_chunks", N, chunks, 0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const gt::PolicyTile t = gt::policy_tile(chunk, N);
    bad_tile += t.i0 != chunk * R || t.rows < 1 || t.rows > R || t.i0 + t.rows > N;
    if (chunk + 1 < chunks) bad_tile += t.i0 + t.rows != gt::policy_tile(chunk + 1, N).i0;
    if (chunk + 1 == chunks) bad_tile += t.i0 + t.rows != N;
  }
  for (int64_t bz = 0; bz < grid_z; ++bz)
    for (int64_t by = 0; by < grid_y; ++by)
      for (int64_t bx = 0; bx < grid_x; ++bx)
        for (int64_t b = bz; b < B; b += grid_z) {
          const double* P = &c.P[static_cast<size_t>(b * N)];
          for (int64_t h = by; h < H; h += grid_y) {
            const int64_t bh = b * H + h;
            for (int64_t chunk = bx; chunk < chunks; chunk += grid_x) {
              const auto [i0, rows] = gt::policy_tile(chunk, N);
              double st_m[64], st_denom[64], st_r[64], st_max_grad[64];
              long long st_arg[64];
              for (int warp = 0; warp < warps; ++warp)
                for (int ii = warp; ii < rows; ii += warps) {
                  const int64_t i = i0 + ii;
                  const int64_t base = gt::policy_elem_at(bh, N, i, 0);
                  const bool ok = ii < R && i < N && base == ((b * H + h) * N + i) * N;
                  bad_index += !ok;
                  if (!ok) continue;
                  ++stats[bh * N + i];
                  const double* l = &c.l[static_cast<size_t>(base)];
                  const double* g = &c.g[static_cast<size_t>(base)];
                  double m = -INFINITY;
                  for (int lane = 0; lane < kEmuWarp; ++lane)
                    for (int64_t j = lane; j < N; j += kEmuWarp) m = max_nan(m, l[j]);
                  long long arg = LLONG_MAX;
                  double s = 0, sum_g_a = 0, sum_g = 0;
                  for (int lane = 0; lane < kEmuWarp; ++lane) {
                    long long lane_arg = LLONG_MAX;
                    for (int64_t j = lane; j < N; j += kEmuWarp) {
                      if (l[j] == m && lane_arg == LLONG_MAX) lane_arg = j;
                      const double a = std::exp(l[j] - m) * gt::policy_weight(P[j], j == i);
                      s += a;
                      sum_g_a += g[j] * a;
                      sum_g += g[j];
                    }
                    arg = std::min(arg, lane_arg);
                  }
                  const double denom = s + c.eps;
                  const double r = (sum_g_a + eps_n * sum_g) / denom;
                  st_m[ii] = m;
                  st_denom[ii] = denom;
                  st_r[ii] = r;
                  st_max_grad[ii] = gt::policy_max_grad(sum_g_a, r, s, denom);
                  st_arg[ii] = arg;
                }
              for (int t = 0; t < kEmuThreads; ++t)
                for (int64_t j = t; j < N; j += kEmuThreads) {
                  const double Pj = P[j];
                  double dp = 0;
                  int64_t last = -1;
                  for (int ii0 = 0; ii0 < rows; ii0 += kEmuBatch) {
                    double lv[kEmuBatch], gv[kEmuBatch];
                    for (int q = 0; q < kEmuBatch; ++q) {
                      const int64_t at = gt::policy_elem_at(bh, N, i0 + ii0 + q, j);
                      const bool in = ii0 + q < rows;
                      if (in) {
                        bad_index += at != ((b * H + h) * N + i0 + ii0 + q) * N + j ||
                                     at < 0 || at >= static_cast<int64_t>(elems);
                        if (at < 0 || at >= static_cast<int64_t>(elems)) continue;
                        ++loads[at];
                      }
                      lv[q] = in ? c.l[at] : 0.0;
                      gv[q] = in ? c.g[at] : 0.0;
                    }
                    for (int q = 0; q < kEmuBatch; ++q) {
                      const int ii = ii0 + q;
                      if (ii >= rows || ii >= R) continue;
                      const int64_t i = i0 + ii;
                      bad_order += i <= last;
                      last = i;
                      const double e = std::exp(lv[q] - st_m[ii]);
                      const double ga = gt::policy_grad_a(gv[q], st_r[ii], st_denom[ii]);
                      double d = ga * e * gt::policy_weight(Pj, j == i);
                      if (j == st_arg[ii]) d -= st_max_grad[ii];
                      const int64_t w = gt::policy_elem_at(bh, N, i, j);
                      if (w < 0 || w >= static_cast<int64_t>(elems)) continue;
                      dl[w] = d;
                      ++dl_writes[w];
                      if (j != i) dp += ga * e;
                    }
                  }
                  const int64_t pa = gt::policy_partial_at(bh, chunks, chunk, N, j);
                  bad_index += pa != ((b * H + h) * chunks + chunk) * N + j || pa < 0 ||
                               pa >= static_cast<int64_t>(parts);
                  if (pa < 0 || pa >= static_cast<int64_t>(parts)) continue;
                  partial[pa] = dp;
                  ++part_writes[pa];
                }
            }
          }
        }
  // policy_reduce_kernel: grid (column tiles of kEmuThreads, B).
  const int64_t per_b = H * gt::policy_chunks(N);
  const int64_t rx = grid_dim((N + kEmuThreads - 1) / kEmuThreads, gx), ry = grid_dim(B, gy);
  for (int64_t by = 0; by < ry; ++by)
    for (int64_t bx = 0; bx < rx; ++bx)
      for (int t = 0; t < kEmuThreads; ++t)
        for (int64_t b = by; b < B; b += ry)
          for (int64_t j = bx * kEmuThreads + t; j < N; j += rx * kEmuThreads) {
            const int64_t src = b * per_b * N + j;
            double s = 0;
            for (int64_t cc = 0; cc < per_b; ++cc) {
              const int64_t at = src + cc * N;
              // Reads in (h, chunk) order: the cc-th is the partial of h = cc / chunks.
              bad_index += at != gt::policy_partial_at(b * H + cc / chunks, chunks, cc % chunks,
                                                       N, j);
              if (at < 0 || at >= static_cast<int64_t>(parts)) {
                ++bad_index;
                continue;
              }
              ++part_reads[at];
              s += partial[at];
            }
            dP[b * N + j] = s;
            ++dp_writes[b * N + j];
          }
  int64_t wrong = 0;
  for (size_t t = 0; t < elems; ++t) wrong += dl_writes[t] != 1 || loads[t] != 1;
  for (size_t t = 0; t < parts; ++t) wrong += part_writes[t] != 1 || part_reads[t] != 1;
  for (int x : stats) wrong += x != 1;
  for (int x : dp_writes) wrong += x != 1;
  const long long key = (B * 100 + H) * 1000 + N;
  expect(wrong == 0, "policy backward covers each element/partial once", key, gx, wrong);
  expect(bad_index == 0, "policy backward indices", key, gx, bad_index);
  expect(bad_order == 0, "policy backward rows ascending per column", key, gx, bad_order);
  expect(bad_tile == 0, "policy tiles", key, chunks, bad_tile);
  std::vector<double> want_dl, want_dP;
  ref_backward(c, want_dl, want_dP);
  const int64_t bad_dl = mismatches(dl, want_dl, 1e-9), bad_dP = mismatches(dP, want_dP, 1e-9);
  expect(bad_dl == 0, "policy grad_logits vs reference", key, gx, bad_dl);
  expect(bad_dP == 0, "policy grad_policy vs reference", key, gx, bad_dP);
}

void policy_cases(std::mt19937_64& rng) {
  reference_check(rng);
  struct Shape {
    int64_t B, H, N;
  };
  const Shape shapes[] = {{1, 1, 1},  {2, 3, 1},  {1, 2, 2},  {2, 2, 5},   {1, 3, 31},
                          {2, 1, 32}, {1, 2, 33}, {2, 2, 35}, {1, 1, 38},  {1, 2, 63},
                          {1, 1, 64}, {2, 1, 65}, {1, 2, 97}, {1, 1, 197}, {1, 1, 258}};
  const int64_t grids[][3] = {{INT32_MAX, 65535, 65535}, {1, 1, 1}, {2, 2, 1}, {3, 1, 2}};
  for (const Shape& sh : shapes) {
    for (int v = 0; v < 2; ++v) {
      const PolicyCase c = policy_case(rng, sh.B, sh.H, sh.N, v ? 1e-2 : 1e-6, v == 1);
      for (const auto& gd : grids) {
        if (sh.N > 100 && gd[0] != 1 && gd[0] != INT32_MAX) continue;
        policy_forward_emulation(c, gd[0], gd[1], gd[2]);
        policy_backward_emulation(c, gd[0], gd[1], gd[2]);
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
  policy_cases(rng);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
