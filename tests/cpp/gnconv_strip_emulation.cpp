// Runs the per-thread work of gnConv's strip-blocked CUDA depthwise kernels (the shared helpers
// of gnconv_math.h) on the host, one work item after another exactly as the kernels number them,
// and compares with a direct convolution in double. This checks the index math, borders, strip
// tails, flipping, strides and row chunks of kernels that CI cannot run. Exit status 0 on success.
// run_vec repeats this for the channel-vectorised kernels of gnconv_cuda.cu (V channels per work
// item, 32-bit item numbering, raw-pack fetches, grouped weight-gradient items), choosing V = 1 or
// the vector width as the launcher does.
#include <cmath>
#include <cstdint>
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
  int64_t gate_channels = 0;  // channels of the fused first gate (vector path choice only)
};

static int failures = 0;

static void expect_close(double got, double want, const char* what, const Case& c, int64_t i) {
  if (!(std::fabs(got - want) <= 1e-9 * (1.0 + std::fabs(want)))) {  // NaN (never written) fails
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

// V doubles of one pixel, as the kernels' raw packs: value-initialised to zeros.
template <int V>
struct Pack {
  double v[V];
};

// Direct definitions (double): the depthwise conv and the weight gradient.
struct Reference {
  std::vector<double> out, wgrad;
};

template <int K>
static Reference reference(const Case& c, const std::vector<double>& src, const std::vector<double>& dy,
                           const std::vector<double>& w, const std::vector<double>& bias) {
  const int64_t HW = c.H * c.W, taps = K * K, pad = K / 2;
  Reference ref{std::vector<double>(c.B * HW * c.S), std::vector<double>(c.S * taps, 0.0)};
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t y = 0; y < c.H; ++y)
      for (int64_t x = 0; x < c.W; ++x)
        for (int64_t ch = 0; ch < c.S; ++ch) {
          double acc = bias[ch];
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t sy = y + t / K - pad, sx = x + t % K - pad;
            if (sy < 0 || sy >= c.H || sx < 0 || sx >= c.W) continue;
            const double in = src[(b * HW + sy * c.W + sx) * c.ld + ch];
            acc += w[(c.flip ? taps - 1 - t : t) * c.S + ch] * in;
            ref.wgrad[ch * taps + t] += dy[(b * HW + y * c.W + x) * c.ld + ch] * in;
          }
          ref.out[(b * HW + y * c.W + x) * c.S + ch] = acc;
        }
  return ref;
}

// The forward kernel depthwise_strip_kernel<T, K, V, R>, item by item.
template <int K, int V, int R>
static void emulate_forward(const Case& c, const std::vector<double>& src, const std::vector<double>& w,
                            const std::vector<double>& bias, const std::vector<double>& want) {
  const DwGeometry g{c.H, c.W, K};
  const int64_t taps = K * K;
  const int64_t items = c.B * c.H * gn::dw_strips_per_row<R>(g) * (c.S / V);
  if (items > INT32_MAX) std::abort();
  std::vector<double> got(c.B * c.H * c.W * c.S, std::nan(""));
  const auto cvt = [](const Pack<V>& p, double (&vals)[V]) {
    for (int v = 0; v < V; ++v) vals[v] = p.v[v];
  };
  for (uint32_t item = 0; item < static_cast<uint32_t>(items); ++item) {
    const gn::DwStrip s = gn::dw_vec_strip<R>(g, static_cast<uint32_t>(c.S / V), V, item);
    if (s.c % V != 0 || s.c + V > c.S) {
      std::printf("FAIL vector group out of range\n");
      ++failures;
      continue;
    }
    double bias_v[V];
    for (int v = 0; v < V; ++v) bias_v[v] = bias[s.c + v];
    gn::depthwise_vec_item<K, R, V>(
        g, s, bias_v,
        [&](int64_t row, int64_t sx) {
          if (row < s.b * c.H || row >= (s.b + 1) * c.H || sx < 0 || sx >= c.W) {
            std::printf("FAIL vector read outside the map\n");
            ++failures;
          }
          Pack<V> p;
          for (int v = 0; v < V; ++v) p.v[v] = src[(row * c.W + sx) * c.ld + s.c + v];
          return p;
        },
        [&](int t) {
          Pack<V> p;
          for (int v = 0; v < V; ++v) p.v[v] = w[(c.flip ? taps - 1 - t : t) * c.S + s.c + v];
          return p;
        },
        cvt,
        [&](int64_t pix, const double (&acc)[V]) {
          for (int v = 0; v < V; ++v) {
            double& o = got[pix * c.S + s.c + v];
            if (!std::isnan(o)) {
              std::printf("FAIL vector output written twice\n");
              ++failures;
            }
            o = acc[v];
          }
        });
  }
  for (size_t i = 0; i < got.size(); ++i) expect_close(got[i], want[i], "vector depthwise", c, i);
}

// The weight-gradient kernel depthwise_weight_grad_strip_kernel<T, K, V, R> with G groups per
// item block, item by item; the chunk partials are then summed as the launcher does.
template <int K, int V, int R, int G>
static void emulate_wgrad(const Case& c, const std::vector<double>& src, const std::vector<double>& dy,
                          const std::vector<double>& want) {
  const DwGeometry g{c.H, c.W, K};
  const int64_t taps = K * K, groups = c.S / V;
  const int64_t items = gn::dw_vec_grad_items<K, G>(groups, c.chunks);
  if (items > INT32_MAX) std::abort();
  std::vector<double> partial(c.chunks * c.S * taps, std::nan(""));
  const auto cvt = [](const Pack<V>& p, double (&vals)[V]) {
    for (int v = 0; v < V; ++v) vals[v] = p.v[v];
  };
  for (uint32_t item = 0; item < static_cast<uint32_t>(items); ++item) {
    bool valid;
    const gn::DwGradItem it = gn::dw_vec_grad_item<K, G>(static_cast<uint32_t>(groups), V, item, &valid);
    if (!valid) continue;
    const auto in_map = [&](int64_t row, int64_t x) {
      if (row < 0 || row >= c.B * c.H || x < 0 || x >= c.W) {
        std::printf("FAIL vector grad read outside the map\n");
        ++failures;
      }
    };
    double part[K][V];
    gn::depthwise_vec_grad_item<K, R, V>(
        g, c.B, c.chunks, it,
        [&](int64_t row, int64_t x) {
          in_map(row, x);
          Pack<V> p;
          for (int v = 0; v < V; ++v) p.v[v] = dy[(row * c.W + x) * c.ld + it.c + v];
          return p;
        },
        [&](int64_t row, int64_t sx) {
          in_map(row, sx);
          Pack<V> p;
          for (int v = 0; v < V; ++v) p.v[v] = src[(row * c.W + sx) * c.ld + it.c + v];
          return p;
        },
        cvt, part);
    for (int v = 0; v < V; ++v)
      for (int kx = 0; kx < K; ++kx) {
        double& o = partial[(it.chunk * c.S + it.c + v) * taps + it.ky * K + kx];
        if (!std::isnan(o)) {
          std::printf("FAIL vector partial written twice\n");
          ++failures;
        }
        o = part[kx][v];
      }
  }
  for (int64_t ch = 0; ch < c.S; ++ch)
    for (int64_t t = 0; t < taps; ++t) {
      double sum = 0.0;
      for (int64_t k = 0; k < c.chunks; ++k) sum += partial[(k * c.S + ch) * taps + t];
      expect_close(sum, want[ch * taps + t], "vector weight grad", c, ch * taps + t);
    }
}

// The launcher's choice for an element type whose 16-byte pack holds V16 channels (forward R
// outputs per strip) and whose weight-gradient pack holds VG channels (RG outputs per strip); the
// fallback is V = 1 with R = 8 and 32-channel item blocks. Pointers are aligned here, so the
// channel count, the row strides and the gate width decide.
template <int K, int V16, int R, int VG, int RG>
static void run_vec(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  const int64_t N = c.B * c.H * c.W, taps = K * K;
  std::vector<double> src(N * c.ld), dy(N * c.ld), w(taps * c.S), bias(c.S);
  for (auto* v : {&src, &dy, &w, &bias}) {
    for (auto& e : *v) e = nd(rng);
  }
  const Reference ref = reference<K>(c, src, dy, w, bias);
  const int64_t fwd_lds[] = {c.ld, c.S, c.ld, c.gate_channels};  // src, dst, gate in, gate out
  if (gn::dw_vector_ok(V16, c.S, c.gate_channels, fwd_lds, 4)) {
    emulate_forward<K, V16, R>(c, src, w, bias, ref.out);
  } else {
    emulate_forward<K, 1, kStrip>(c, src, w, bias, ref.out);
  }
  const int64_t grad_lds[] = {c.ld, c.ld};
  if (gn::dw_vector_ok(VG, c.S, 0, grad_lds, 2)) {
    emulate_wgrad<K, VG, RG, 8>(c, src, dy, ref.wgrad);
  } else {
    emulate_wgrad<K, 1, kStrip, 32>(c, src, dy, ref.wgrad);
  }
}

// The four element types' configurations of gnconv_cuda.cu (kVec, kVecStrip, kGradVec,
// kGradStrip) for kernel size K.
template <int K>
static void run_vec_all(const Case& c, std::mt19937& rng) {
  run_vec<K, 8, 4, 4, 8>(c, rng);                  // fp16 / bf16
  run_vec<K, 4, K == 7 ? 6 : 8, 4, 4>(c, rng);     // fp32
  run_vec<K, 2, 4, 2, 4>(c, rng);                  // fp64
}

int main() {
  std::mt19937 rng(0);
  const Case cases[] = {
      {2, 13, 17, 5, 7, false, 3}, {2, 13, 17, 5, 5, true, 1},  {1, 1, 1, 3, 3, false, 1},
      {3, 5, 9, 4, 6, true, 100},  {1, 8, 16, 2, 2, false, 8},  {2, 2, 23, 1, 1, true, 4},
      {1, 14, 14, 6, 9, false, 7},
  };
  // Channel counts around the vector widths (8, 4, 2): multiples of 8 with aligned and unaligned
  // strides and gate widths, 12 (a multiple of 4, not 8), odd ones; maps narrower than a strip
  // or the kernel, and widths that leave a partial last strip for every R.
  const Case vec_cases[] = {
      {2, 13, 17, 16, 24, false, 3, 8}, {1, 7, 9, 24, 40, true, 2, 8},   {2, 5, 3, 8, 8, false, 1, 0},
      {1, 1, 1, 8, 8, true, 1, 8},      {3, 6, 11, 12, 12, false, 4, 4}, {1, 9, 20, 32, 48, true, 5, 16},
      {2, 4, 7, 8, 12, false, 3, 8},    {1, 11, 13, 16, 16, false, 6, 4}, {2, 3, 2, 72, 80, true, 2, 8},
      {1, 6, 25, 10, 12, false, 3, 2},  {2, 13, 17, 5, 7, false, 3, 0},  {1, 8, 19, 40, 40, true, 20, 40},
  };
  int n = 0;
  for (const Case& c : cases) {
    run<3>(c, rng);
    run<5>(c, rng);
    run<7>(c, rng);
    n += 3;
  }
  for (const Case* set : {cases, vec_cases}) {
    const size_t count = set == cases ? sizeof(cases) / sizeof(Case) : sizeof(vec_cases) / sizeof(Case);
    for (size_t i = 0; i < count; ++i) {
      run_vec_all<3>(set[i], rng);
      run_vec_all<5>(set[i], rng);
      run_vec_all<7>(set[i], rng);
      n += 9;
    }
  }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
