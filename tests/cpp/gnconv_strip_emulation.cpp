// Runs the per-thread work of gnConv's strip-blocked CUDA depthwise kernels (the shared helpers
// of gnconv_math.h) on the host, one work item after another exactly as the kernels number them,
// and compares with a direct convolution in double. This checks the index math, borders, strip
// tails, flipping, strides and row chunks of kernels that CI cannot run. Exit status 0 on success.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ops/gnconv/gnconv_math.h"

using tokenmix::gnconv::DwGeometry;
namespace gn = tokenmix::gnconv;

constexpr int kStrip = 8;  // as in gnconv_cuda.cu

struct Case {
  int64_t B, H, W, S, ld;  // ld: row stride of the channels-last operands (>= S)
  bool flip;
  int64_t chunks;
};

static int failures = 0;

static void expect_close(double got, double want, const char* what, const Case& c, int64_t i) {
  if (std::fabs(got - want) > 1e-9 * (1.0 + std::fabs(want))) {
    if (failures++ < 10) {
      std::printf("FAIL %s B=%lld H=%lld W=%lld S=%lld flip=%d chunks=%lld at %lld: %.12g vs %.12g\n",
                  what, (long long)c.B, (long long)c.H, (long long)c.W, (long long)c.S, c.flip,
                  (long long)c.chunks, (long long)i, got, want);
    }
  }
}

template <int K>
static void run(const Case& c, std::mt19937& rng) {
  const DwGeometry g{c.H, c.W, K};
  const int64_t HW = c.H * c.W, N = c.B * HW, taps = K * K, pad = K / 2;
  std::normal_distribution<double> nd;
  std::vector<double> src(N * c.ld), dy(N * c.ld), w(taps * c.S), bias(c.S);
  for (auto* v : {&src, &dy, &w, &bias}) {
    for (auto& e : *v) e = nd(rng);
  }
  // w is tap-major, [taps, S], as the launcher passes it.
  const auto wt_of = [&](int64_t t, int64_t ch) { return w[(c.flip ? taps - 1 - t : t) * c.S + ch]; };

  std::vector<double> want(N * c.S, 0.0), got(N * c.S, std::nan(""));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t y = 0; y < c.H; ++y)
      for (int64_t x = 0; x < c.W; ++x)
        for (int64_t ch = 0; ch < c.S; ++ch) {
          double acc = bias[ch];
          for (int64_t ky = 0; ky < K; ++ky)
            for (int64_t kx = 0; kx < K; ++kx) {
              const int64_t sy = y + ky - pad, sx = x + kx - pad;
              if (sy < 0 || sy >= c.H || sx < 0 || sx >= c.W) continue;
              acc += wt_of(ky * K + kx, ch) * src[(b * HW + sy * c.W + sx) * c.ld + ch];
            }
          want[(b * HW + y * c.W + x) * c.S + ch] = acc;
        }

  const int64_t items = c.B * c.H * gn::dw_strips_per_row<kStrip>(g) * c.S;
  for (int64_t item = 0; item < items; ++item) {
    const gn::DwStrip s = gn::dw_strip<kStrip>(g, c.S, item);
    const int64_t ch = s.c;
    gn::depthwise_item<K, kStrip>(
        g, s, bias[ch],
        [&](int64_t b, int64_t sy, int64_t sx) {
          if (sy < 0 || sy >= c.H || sx < 0 || sx >= c.W) {
            std::printf("FAIL read outside the map\n");
            ++failures;
          }
          return src[(b * HW + sy * c.W + sx) * c.ld + ch];
        },
        [&](int t) { return wt_of(t, ch); },
        [&](int64_t pix, double acc) {
          if (!std::isnan(got[pix * c.S + ch])) {
            std::printf("FAIL output written twice\n");
            ++failures;
          }
          got[pix * c.S + ch] = acc;
        });
  }
  for (int64_t i = 0; i < N * c.S; ++i) expect_close(got[i], want[i], "depthwise", c, i);

  // Weight gradient: dW[ch, t] = sum over pixels of dy[p, ch] * src[p + o_t, ch].
  std::vector<double> wgrad_want(c.S * taps, 0.0), wgrad_got(c.S * taps, 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t y = 0; y < c.H; ++y)
      for (int64_t x = 0; x < c.W; ++x)
        for (int64_t ch = 0; ch < c.S; ++ch)
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t sy = y + t / K - pad, sx = x + t % K - pad;
            if (sy < 0 || sy >= c.H || sx < 0 || sx >= c.W) continue;
            wgrad_want[ch * taps + t] +=
                dy[(b * HW + y * c.W + x) * c.ld + ch] * src[(b * HW + sy * c.W + sx) * c.ld + ch];
          }
  std::vector<double> partial(c.chunks * c.S * taps, std::nan(""));
  for (int64_t item = 0; item < c.chunks * K * c.S; ++item) {
    const gn::DwGradItem it = gn::dw_grad_item<K>(c.S, item);
    double part[K];
    gn::depthwise_grad_item<K, kStrip>(
        g, c.B, c.chunks, it,
        [&](int64_t row, int64_t x) { return dy[(row * c.W + x) * c.ld + it.c]; },
        [&](int64_t b, int64_t sy, int64_t sx) { return src[(b * HW + sy * c.W + sx) * c.ld + it.c]; },
        part);
    for (int kx = 0; kx < K; ++kx) partial[(it.chunk * c.S + it.c) * taps + it.ky * K + kx] = part[kx];
  }
  for (int64_t ch = 0; ch < c.S; ++ch)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t k = 0; k < c.chunks; ++k) wgrad_got[ch * taps + t] += partial[(k * c.S + ch) * taps + t];
  for (int64_t i = 0; i < c.S * taps; ++i) expect_close(wgrad_got[i], wgrad_want[i], "weight grad", c, i);
}

int main() {
  std::mt19937 rng(0);
  const Case cases[] = {
      {2, 13, 17, 5, 7, false, 3}, {2, 13, 17, 5, 5, true, 1},  {1, 1, 1, 3, 3, false, 1},
      {3, 5, 9, 4, 6, true, 100},  {1, 8, 16, 2, 2, false, 8},  {2, 2, 23, 1, 1, true, 4},
      {1, 14, 14, 6, 9, false, 7},
  };
  int n = 0;
  for (const Case& c : cases) {
    run<3>(c, rng);
    run<5>(c, rng);
    run<7>(c, rng);
    n += 3;
  }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
