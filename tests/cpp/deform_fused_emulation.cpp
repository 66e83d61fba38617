// Runs deform_conv2d's fused CUDA forward (fused_forward_kernel) on the host, block by block and
// thread by thread in the kernel's order, for both N tiles (FusedTile<64> and FusedTile<128>, the
// launcher picking 64 when Cout <= 64), with the kernel's own index math from
// deform_conv2d_math.h: each thread's row split once (divmod), its run of A columns found per chunk
// in 32 bits (run_columns when one sample position serves the run, with the offsets key cache and
// the one-chunk-ahead offset prefetch; ColumnWalk32 otherwise), its corners addressed from
// corner_base(), the weight slice staged as the 16-byte segments or the scalar copy, the tile product
// standing in for the tensor cores, and the epilogue writing through out_row_base(). Every split is
// compared with the int64 one it replaces (ImplicitGemm, ColumnWalk, Geometry::base_y/x,
// ImplicitGemm::out_index) at every thread and chunk, including tile edges in M, N and K; the
// result is compared with a direct deformable convolution, and every output element, A slot and B
// slot must be written exactly once. Exit status 0 on success.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "ops/deform_conv2d/deform_conv2d_math.h"

namespace df = tokenmix::deform_conv2d;
using IG = df::ImplicitGemm;

struct Case {
  int64_t B, Cin, Cout, G, H, W, kh, kw, s, pad, dil;
  bool mask, bias;
};

struct Problem {
  Case c;
  df::Geometry g;
  std::vector<double> input, offset, mask, weight, bias;
};

Problem make(const Case& c, std::mt19937& rng) {
  Problem p{c, {}, {}, {}, {}, {}, {}};
  const int64_t Ho = (c.H + 2 * c.pad - c.dil * (c.kh - 1) - 1) / c.s + 1;
  const int64_t Wo = (c.W + 2 * c.pad - c.dil * (c.kw - 1) - 1) / c.s + 1;
  p.g = df::Geometry{c.H, c.W, Ho, Wo, c.kh, c.kw, c.s, c.s, c.pad, c.pad, c.dil, c.dil};
  std::normal_distribution<double> n(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, int64_t size, double scale) {
    v.resize(size);
    for (auto& x : v) x = scale * n(rng);
  };
  const int64_t kk = p.g.taps(), P = Ho * Wo;
  fill(p.input, c.B * c.Cin * c.H * c.W, 1.0);
  fill(p.offset, c.B * 2 * c.G * kk * P, 2.5);  // samples well outside the map too
  if (c.mask) fill(p.mask, c.B * c.G * kk * P, 1.0);
  fill(p.weight, c.Cout * c.Cin * kk, 1.0);
  if (c.bias) fill(p.bias, c.Cout, 1.0);
  return p;
}

// Where tap `tap` of offset group go samples for output pixel pix of image b, and its mask.
struct Position {
  df::Corners<double> cn;
  double m;
};
Position position(const Problem& p, int64_t b, int64_t go, int64_t tap, int64_t pix) {
  const df::Geometry& g = p.g;
  const int64_t P = g.Ho * g.Wo;
  const int64_t ch = df::offset_channel(p.c.G, g.taps(), b, go, tap);
  const double y = static_cast<double>(g.base_y(pix / g.Wo, tap)) + p.offset[(2 * ch) * P + pix];
  const double x = static_cast<double>(g.base_x(pix % g.Wo, tap)) + p.offset[(2 * ch + 1) * P + pix];
  return {df::corners(y, x, g.H, g.W, true), p.c.mask ? p.mask[ch * P + pix] : 1.0};
}

// Masked bilinear sample of channel c of image b at a position.
double sample_at(const Problem& p, int64_t b, int64_t c, const Position& at) {
  const double* plane = p.input.data() + (b * p.c.Cin + c) * p.g.H * p.g.W;
  double v = 0;
  for (int k = 0; k < 4; ++k) {
    if (at.cn.valid[k]) v += at.cn.w[k] * plane[at.cn.idx[k]];
  }
  return v * at.m;
}

double sample(const Problem& p, int64_t b, int64_t c, int64_t tap, int64_t pix) {
  return sample_at(p, b, c, position(p, b, c / (p.c.Cin / p.c.G), tap, pix));
}

// Direct definition: out[b, n, pix] = bias[n] + sum_{c, tap} W[n, c, tap] * sample(b, c, tap, pix).
std::vector<double> direct(const Problem& p) {
  const int64_t kk = p.g.taps(), P = p.g.Ho * p.g.Wo;
  std::vector<double> out(p.c.B * p.c.Cout * P);
  for (int64_t b = 0; b < p.c.B; ++b)
    for (int64_t n = 0; n < p.c.Cout; ++n)
      for (int64_t pix = 0; pix < P; ++pix) {
        double acc = p.c.bias ? p.bias[n] : 0.0;
        for (int64_t c = 0; c < p.c.Cin; ++c)
          for (int64_t t = 0; t < kk; ++t) acc += p.weight[(n * p.c.Cin + c) * kk + t] * sample(p, b, c, t, pix);
        out[(b * p.c.Cout + n) * P + pix] = acc;
      }
  return out;
}


// One thread's ARun state across the K walk (deform_conv2d_cuda.cu), positions in double.
struct Run {
  bool row_ok = false;
  int64_t b = 0, pix = 0;
  uint32_t oy = 0, ox = 0;
  int64_t img = 0, offr = 0, mskr = 0;  // element offsets into input, offset, mask
  int64_t base = 0;
  double w[4] = {0, 0, 0, 0}, mod = 0;
  bool valid[4] = {false, false, false, false};
  uint32_t key = 0xffffffffu, pf_key = 0xffffffffu;
  double pf_dy = 0, pf_dx = 0, pf_m = 0;
};

struct Fused {
  const Problem& p;
  int64_t kk, P, HW, Cg;
  IG ig;
  uint32_t K, Cin, Cg32, kk32, kw32, Wo32;
  bool ok = true;

  explicit Fused(const Problem& pr)
      : p(pr), kk(pr.g.taps()), P(pr.g.Ho * pr.g.Wo), HW(pr.g.H * pr.g.W), Cg(pr.c.Cin / pr.c.G),
        ig(IG::make(pr.c.B, pr.c.Cin, pr.c.Cout, pr.g.taps(), pr.g.Ho * pr.g.Wo)),
        K(static_cast<uint32_t>(ig.K)), Cin(static_cast<uint32_t>(pr.c.Cin)), Cg32(static_cast<uint32_t>(Cg)),
        kk32(static_cast<uint32_t>(kk)), kw32(static_cast<uint32_t>(pr.g.kw)),
        Wo32(static_cast<uint32_t>(pr.g.Wo)) {}

  void fail(const char* what) {
    if (ok) std::printf("FAIL %s\n", what);
    ok = false;
  }

  // The kernel's per-thread setup: the row split once, image and offset bases.
  Run setup(int64_t m) {
    Run r;
    r.row_ok = m < ig.M;
    const auto bp = df::divmod<int64_t>(r.row_ok ? m : 0, P);
    r.b = bp.q;
    r.pix = bp.r;
    if (r.row_ok && (r.b != ig.image(m) || r.pix != ig.pixel(m))) fail("row split");
    const auto oyx = df::divmod<uint32_t>(static_cast<uint32_t>(r.pix), Wo32);
    r.oy = oyx.q;
    r.ox = oyx.r;
    if (r.oy != r.pix / p.g.Wo || r.ox != r.pix % p.g.Wo) fail("pixel split");
    r.img = r.b * p.c.Cin * HW;
    const int64_t offs = kk * p.c.G;
    r.offr = 2 * r.b * offs * P + r.pix;
    r.mskr = r.b * offs * P + r.pix;
    return r;
  }

  // load_offsets(): the key-relative addresses must be the int64 offset_channel ones.
  void load_offsets(const Run& r, uint32_t key, uint32_t go, uint32_t tap, double* dy, double* dx, double* m) {
    const int64_t ch = df::offset_channel(p.c.G, kk, r.b, go, tap);
    const int64_t a = r.offr + (2 * static_cast<int64_t>(key)) * P;
    const int64_t b = r.offr + (2 * static_cast<int64_t>(key) + 1) * P;
    const int64_t c = r.mskr + static_cast<int64_t>(key) * P;
    if (a != 2 * ch * P + r.pix || b != (2 * ch + 1) * P + r.pix || c != ch * P + r.pix) fail("offset address");
    *dy = p.offset[a];
    *dx = p.offset[b];
    *m = p.c.mask ? p.mask[c] : 1.0;
  }

  df::Corners<double> place(const Run& r, uint32_t tap, double dy, double dx) {
    const auto kt = df::divmod<uint32_t>(tap, kw32);
    const int64_t y0 = df::origin_y(p.g, r.oy, kt.q), x0 = df::origin_x(p.g, r.ox, kt.r);
    if (y0 != p.g.base_y(r.pix / p.g.Wo, tap) || x0 != p.g.base_x(r.pix % p.g.Wo, tap)) fail("sample origin");
    return df::corners(static_cast<double>(y0) + dy, static_cast<double>(x0) + dx, p.g.H, p.g.W, true);
  }

  // ARun::sample for the run at column kc; returns the kRun values the thread writes to As.
  void sample(Run& r, uint32_t kc, bool shared, double out[IG::kRun]) {
    // The int64 reference: ColumnWalk over the same columns.
    df::ColumnWalk ref(kc, p.c.Cin, Cg);
    if (shared) {
      const bool live = r.row_ok && kc < K;
      for (int i = 0; i < IG::kRun; ++i) out[i] = 0;
      if (!live) return;
      const df::RunColumns rc = df::run_columns(kc, Cin, Cg32, kk32);
      for (int i = 0; i < IG::kRun; ++i, ref.next()) {
        if (ref.k >= ig.K || ref.tap != rc.tap || ref.c != rc.c + i || ref.go != rc.go || ref.fresh != (i == 0) ||
            ref.tap != ig.tap(ref.k) || ref.c != ig.channel(ref.k)) {
          fail("run_columns differs from ColumnWalk");
        }
      }
      if (rc.key != rc.go * kk32 + rc.tap) fail("offset key");
      if (rc.key != r.key) {
        double dy, dx, m;
        if (rc.key == r.pf_key) {
          dy = r.pf_dy;
          dx = r.pf_dx;
          m = r.pf_m;
          double dy2, dx2, m2;
          load_offsets(r, rc.key, rc.go, rc.tap, &dy2, &dx2, &m2);
          if (!(dy == dy2 || (dy != dy && dy2 != dy2)) || !(dx == dx2 || (dx != dx && dx2 != dx2)) || m != m2) {
            fail("prefetched offsets");
          }
        } else {
          load_offsets(r, rc.key, rc.go, rc.tap, &dy, &dx, &m);
        }
        r.key = rc.key;
        const df::Corners<double> cn = place(r, rc.tap, dy, dx);
        r.mod = m;
        r.base = df::corner_base(cn, p.g.W);
        for (int k = 0; k < 4; ++k) {
          r.w[k] = cn.w[k];
          r.valid[k] = cn.valid[k];
        }
        // The corners must be those of the reference position of this run.
        const Position want = position(p, r.b, rc.go, rc.tap, r.pix);
        for (int k = 0; k < 4; ++k) {
          if (want.cn.valid[k] != cn.valid[k] || (cn.valid[k] && want.cn.idx[k] != cn.idx[k])) fail("corners");
        }
      }
      const int64_t at = static_cast<int64_t>(rc.c) * HW + r.base;
      for (int i = 0; i < IG::kRun; ++i) {
        double v = 0;
        for (int k = 0; k < 4; ++k) {
          if (!r.valid[k]) continue;
          const int64_t e = r.img + at + i * HW + (k / 2) * p.g.W + k % 2;
          const int64_t want = (r.b * p.c.Cin + rc.c + i) * HW + (e - r.img - (rc.c + i) * HW);
          if (e != want || e - r.img - (rc.c + i) * HW < 0 || e - r.img - (rc.c + i) * HW >= HW) fail("corner address");
          v += r.w[k] * p.input[e];
        }
        out[i] = v * r.mod;
      }
      if (kc + IG::BK < K) {
        const df::RunColumns nx = df::run_columns(kc + IG::BK, Cin, Cg32, kk32);
        if (nx.key != r.key && nx.key != r.pf_key) {
          r.pf_key = nx.key;
          load_offsets(r, nx.key, nx.go, nx.tap, &r.pf_dy, &r.pf_dx, &r.pf_m);
        }
      }
    } else {
      df::ColumnWalk32 col(kc, Cin, Cg32);
      df::Corners<double> cn{};
      double m = 0;
      for (int i = 0; i < IG::kRun; ++i, col.next(), ref.next()) {
        if (col.k != ref.k || col.tap != ref.tap || col.c != ref.c || col.go != ref.go || col.fresh != ref.fresh) {
          fail("ColumnWalk32 differs from ColumnWalk");
        }
        double v = 0;
        if (r.row_ok && col.k < K) {
          if (col.fresh) {
            double dy, dx;
            load_offsets(r, col.go * kk32 + col.tap, col.go, col.tap, &dy, &dx, &m);
            cn = place(r, col.tap, dy, dx);
          }
          const double* plane = p.input.data() + r.img + static_cast<int64_t>(col.c) * HW;
          for (int k = 0; k < 4; ++k) {
            if (cn.valid[k]) v += cn.w[k] * plane[cn.idx[k]];
          }
          v *= m;
        }
        out[i] = v;
      }
    }
  }

  template <int BN>
  std::vector<double> run(bool b_vec, std::vector<int>& writes) {
    using Tile = df::FusedTile<BN>;
    const bool shared = Cg % IG::kRun == 0;
    std::vector<double> wt(p.c.Cout * ig.K);
    for (int64_t n = 0; n < p.c.Cout; ++n)
      for (int64_t c = 0; c < p.c.Cin; ++c)
        for (int64_t t = 0; t < kk; ++t) wt[n * ig.K + t * p.c.Cin + c] = p.weight[(n * p.c.Cin + c) * kk + t];
    std::vector<double> out(p.c.B * p.c.Cout * P, 0.0);
    writes.assign(out.size(), 0);
    std::vector<double> As(IG::BK * IG::BM), Bs(BN * IG::BK), Cs(IG::BM * BN);
    const int64_t N = p.c.Cout;
    for (int64_t bx = 0; bx < ig.row_blocks(); ++bx)
      for (int64_t by = 0; by < Tile::col_blocks(N); ++by) {
        const int64_t m0 = bx * IG::BM, n0 = by * BN;
        std::fill(Cs.begin(), Cs.end(), 0.0);
        std::vector<Run> runs(IG::kThreads);
        for (int t = 0; t < IG::kThreads; ++t) runs[t] = setup(m0 + IG::a_row(t));
        for (uint32_t k0 = 0; k0 < K; k0 += IG::BK) {
          std::vector<int> filled(As.size(), 0), bfilled(Bs.size(), 0);
          for (int t = 0; t < IG::kThreads; ++t) {
            const int a_row = IG::a_row(t), a_col = IG::a_col(t);
            double v[IG::kRun];
            sample(runs[t], k0 + a_col, shared, v);
            for (int i = 0; i < IG::kRun; ++i) {
              As[(a_col + i) * IG::BM + a_row] = v[i];
              ++filled[(a_col + i) * IG::BM + a_row];
            }
          }
          for (int f : filled) {
            if (f != 1) fail("A slot not filled exactly once");
          }
          for (int t = 0; t < IG::kThreads; ++t) {
            if (b_vec) {
              for (int s = 0; s < Tile::kSegsPerThread; ++s) {
                const int seg = t + s * IG::kThreads, n = Tile::seg_row(seg), kc = Tile::seg_col(seg);
                const bool in = n0 + n < N && k0 + kc < K;
                for (int e = 0; e < 8; ++e) {
                  if (in && (n0 + n) * ig.K + k0 + kc + e >= (n0 + n + 1) * ig.K) fail("B segment crosses a row");
                  Bs[n * IG::BK + kc + e] = in ? wt[(n0 + n) * ig.K + k0 + kc + e] : 0.0;
                  ++bfilled[n * IG::BK + kc + e];
                }
              }
            } else {
              for (int i = t; i < BN * IG::BK; i += IG::kThreads) {
                const int n = i / IG::BK, kl = i % IG::BK;
                Bs[n * IG::BK + kl] = (n0 + n < N && k0 + kl < K) ? wt[(n0 + n) * ig.K + k0 + kl] : 0.0;
                ++bfilled[n * IG::BK + kl];
              }
            }
          }
          for (int f : bfilled) {
            if (f != 1) fail("B slot not filled exactly once");
          }
          for (int n = 0; n < BN; ++n)
            for (int m = 0; m < IG::BM; ++m)
              for (int kl = 0; kl < IG::BK; ++kl) Cs[n * IG::BM + m] += As[kl * IG::BM + m] * Bs[n * IG::BK + kl];
        }
        for (int t = 0; t < IG::kThreads; ++t) {
          const Run& r = runs[t];
          if (!r.row_ok) continue;
          const int a_row = IG::a_row(t);
          for (int s = 0; s < Tile::kColSteps; ++s) {
            const int n = t / IG::BM + s * Tile::kColStep;
            if (n0 + n >= N) continue;
            const int64_t o = df::out_row_base(r.b, N, P, r.pix) + (n0 + n) * P;
            if (o != ig.out_index(m0 + a_row, n0 + n)) fail("output index");
            out[o] = Cs[n * IG::BM + a_row] + (p.c.bias ? p.bias[n0 + n] : 0.0);
            ++writes[o];
          }
        }
      }
    return out;
  }
};

int main() {
  // LIT's merge (k = s = 2), DCNv2 3x3 with a mask (Cin 64, Cout 64: one run per position, a tap
  // every two chunks), dilation 2 with two offset groups, channel counts that leave K and N tails
  // (N tails in both tiles: Cout 72, 136), group sizes of 8 (a new offset key every chunk, the
  // prefetch used every chunk), batch 1 and 3, non-finite offsets.
  const Case cases[] = {
      {2, 32, 16, 1, 8, 10, 2, 2, 2, 0, 1, false, true},  {1, 12, 8, 1, 7, 6, 3, 3, 1, 1, 1, true, true},
      {3, 10, 6, 2, 9, 7, 3, 3, 1, 1, 2, true, false},    {1, 40, 136, 4, 6, 6, 2, 2, 2, 0, 1, false, true},
      {2, 3, 5, 1, 5, 9, 1, 1, 1, 0, 1, true, true},      {1, 64, 64, 1, 9, 9, 3, 3, 1, 1, 1, true, true},
      {2, 16, 72, 2, 7, 5, 3, 3, 1, 1, 1, true, true},    {1, 24, 65, 3, 5, 6, 2, 2, 1, 0, 1, false, false},
      {3, 8, 20, 1, 6, 5, 2, 3, 1, 1, 1, true, true},
  };
  std::mt19937 rng(7);
  int failures = 0, n = 0;
  for (const Case& c : cases) {
    Problem p = make(c, rng);
    ++n;
    if (n == 7) {  // offsets a network might predict: NaN and infinities read zero
      p.offset[3] = std::numeric_limits<double>::quiet_NaN();
      p.offset[10] = std::numeric_limits<double>::infinity();
      p.offset[p.offset.size() - 5] = -std::numeric_limits<double>::infinity();
    }
    const std::vector<double> want = direct(p);
    Fused f(p);
    for (int tile = 0; tile < 2; ++tile) {
      for (int vec = 0; vec < (f.ig.K % 8 == 0 ? 2 : 1); ++vec) {
        std::vector<int> writes;
        const std::vector<double> got = tile == 0 ? f.run<64>(vec == 1, writes) : f.run<128>(vec == 1, writes);
        if (!f.ok) {
          std::printf("FAIL case %d (BN %d, vec %d): index math differs from the int64 reference\n", n,
                      tile == 0 ? 64 : 128, vec);
          ++failures;
          f.ok = true;
          continue;
        }
        double err = 0;
        for (size_t i = 0; i < want.size(); ++i) {
          err = std::fmax(err, std::fabs(got[i] - want[i]) / (1.0 + std::fabs(want[i])));
          if (writes[i] != 1) {
            if (failures++ < 10) std::printf("FAIL case %d: output %zu written %d times\n", n, i, writes[i]);
          }
        }
        if (!(err <= 1e-12)) {
          std::printf("FAIL case %d (BN %d, vec %d): max rel err %.3e\n", n, tile == 0 ? 64 : 128, vec, err);
          ++failures;
        }
      }
    }
  }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
