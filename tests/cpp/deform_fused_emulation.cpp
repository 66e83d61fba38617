// Runs deform_conv2d's fused CUDA forward (fused_forward_kernel) on the host, block by block and
// thread by thread in the kernel's order, with ImplicitGemm's tiling, tap-major columns,
// ColumnWalk and output indexing from deform_conv2d_math.h: each thread samples its run of A columns
// (reusing the sample position where ColumnWalk says it has not changed), the block stages its
// slice of the reordered weight, the tile product stands in for the tensor cores, and the
// epilogue writes the output. Compares with a direct deformable convolution and checks that every output element is
// written exactly once. Exit status 0 on success.
#include <cmath>
#include <cstdio>
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

// The kernel's schedule. Returns the output and counts writes per element in `writes`.
std::vector<double> fused(const Problem& p, std::vector<int>& writes) {
  const int64_t kk = p.g.taps(), P = p.g.Ho * p.g.Wo, Cg = p.c.Cin / p.c.G;
  const IG ig = IG::make(p.c.B, p.c.Cin, p.c.Cout, kk, P);
  // The launcher's reorder: [Cout, Cin, kh, kw] -> [Cout, kh, kw, Cin].
  std::vector<double> wt(p.c.Cout * ig.K);
  for (int64_t n = 0; n < p.c.Cout; ++n)
    for (int64_t c = 0; c < p.c.Cin; ++c)
      for (int64_t t = 0; t < kk; ++t) wt[n * ig.K + t * p.c.Cin + c] = p.weight[(n * p.c.Cin + c) * kk + t];
  std::vector<double> out(p.c.B * p.c.Cout * P, 0.0);
  writes.assign(out.size(), 0);
  std::vector<double> As(IG::BK * IG::BM), Bs(IG::BN * IG::BK), Cs(IG::BM * IG::BN);
  for (int64_t bx = 0; bx < ig.row_blocks(); ++bx)
    for (int64_t by = 0; by < ig.col_blocks(); ++by) {
      const int64_t m0 = bx * IG::BM, n0 = by * IG::BN;
      std::fill(Cs.begin(), Cs.end(), 0.0);
      for (int64_t k0 = 0; k0 < ig.K; k0 += IG::BK) {
        std::vector<int> filled(As.size(), 0);
        for (int t = 0; t < IG::kThreads; ++t) {
          const int a_row = IG::a_row(t), a_col = IG::a_col(t);
          const int64_t m = m0 + a_row;
          const bool row_ok = m < ig.M;
          const int64_t b = row_ok ? ig.image(m) : 0, pix = row_ok ? ig.pixel(m) : 0;
          df::ColumnWalk col(k0 + a_col, p.c.Cin, Cg);
          Position at{};
          for (int r = 0; r < IG::kRun; ++r, col.next()) {
            double v = 0;
            if (row_ok && col.k < ig.K) {
              // The walk must agree with the direct decomposition of k.
              if (col.tap != ig.tap(col.k) || col.c != ig.channel(col.k) || col.go != col.c / Cg ||
                  col.go >= p.c.G) {
                return {};
              }
              if (col.fresh) at = position(p, b, col.go, col.tap, pix);
              v = sample_at(p, b, col.c, at);
            }
            As[(a_col + r) * IG::BM + a_row] = v;
            ++filled[(a_col + r) * IG::BM + a_row];
          }
        }
        for (int f : filled) {
          if (f != 1) return {};  // every A slot of the chunk filled exactly once
        }
        for (int i = 0; i < IG::BN * IG::BK; ++i) {
          const int n = i / IG::BK, kl = i % IG::BK;
          Bs[n * IG::BK + kl] = (n0 + n < ig.N && k0 + kl < ig.K) ? wt[(n0 + n) * ig.K + k0 + kl] : 0.0;
        }
        for (int n = 0; n < IG::BN; ++n)
          for (int m = 0; m < IG::BM; ++m)
            for (int kl = 0; kl < IG::BK; ++kl) Cs[n * IG::BM + m] += As[kl * IG::BM + m] * Bs[n * IG::BK + kl];
      }
      for (int i = 0; i < IG::BM * IG::BN; ++i) {
        const int r = i % IG::BM, n = i / IG::BM;
        const int64_t mm = m0 + r, nn = n0 + n;
        if (mm < ig.M && nn < ig.N) {
          const int64_t o = ig.out_index(mm, nn);
          out[o] = Cs[n * IG::BM + r] + (p.c.bias ? p.bias[nn] : 0.0);
          ++writes[o];
        }
      }
    }
  return out;
}

int main() {
  // LIT's merge (k = s = 2), DCNv2 3x3 with a mask, dilation 2 with two offset groups, channel
  // counts that leave K and N tails, more output channels than one block column, batch 1 and 3.
  const Case cases[] = {
      {2, 32, 16, 1, 8, 10, 2, 2, 2, 0, 1, false, true},
      {1, 12, 8, 1, 7, 6, 3, 3, 1, 1, 1, true, true},
      {3, 10, 6, 2, 9, 7, 3, 3, 1, 1, 2, true, false},
      {1, 40, 136, 4, 6, 6, 2, 2, 2, 0, 1, false, true},
      {2, 3, 5, 1, 5, 9, 1, 1, 1, 0, 1, true, true},
  };
  std::mt19937 rng(7);
  int failures = 0, n = 0;
  for (const Case& c : cases) {
    const Problem p = make(c, rng);
    std::vector<int> writes;
    const std::vector<double> want = direct(p), got = fused(p, writes);
    ++n;
    if (got.size() != want.size()) {
      std::printf("FAIL case %d: a tile slot was not filled exactly once or a group out of range\n", n);
      ++failures;
      continue;
    }
    double err = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      err = std::fmax(err, std::fabs(got[i] - want[i]) / (1.0 + std::fabs(want[i])));
      if (writes[i] != 1) {
        if (failures++ < 10) std::printf("FAIL case %d: output %zu written %d times\n", n, i, writes[i]);
      }
    }
    if (err > 1e-12) {
      std::printf("FAIL case %d: max rel err %.3e\n", n, err);
      ++failures;
    }
  }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
