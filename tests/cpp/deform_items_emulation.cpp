// Enumerates the work items of deform_conv2d's CUDA sampling kernels (im2col, col2im,
// col2im_coord) on the host, exactly as the kernels number and split them, and checks:
// - the 32-bit and int64 splits the kernels use (sample_item_as, coord_item, divmod, origin_y/x)
//   equal the int64 reference decomposition (sample_item, the coordinate kernel's original split,
//   Geometry::base_y/base_x) for every item;
// - together the items address every column of the chunk exactly once, each with the image,
//   channel, tap and pixel that column stands for, a channel inside the item's offset group, and
//   the kernels' batched per-channel addressing (kChanBatch channels at a time, planes and columns
//   advanced by a stride) reaching the same column and plane as column_index();
// - corner_base() addresses every valid corner of corners() as the kernels do.
// Exit status 0 on success.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "ops/deform_conv2d/deform_conv2d_math.h"

namespace df = tokenmix::deform_conv2d;

constexpr int64_t kChansPerItem = 16;  // as in deform_conv2d_cuda.cu
constexpr int kChanBatch = 4;          // as in deform_conv2d_cuda.cu

int failures = 0;

void fail(const char* what, long long at) {
  if (failures++ < 10) std::printf("FAIL %s at %lld\n", what, at);
}

bool same(const df::SampleItem& a, const df::SampleItem& b) {
  return a.b == b.b && a.go == b.go && a.c_lo == b.c_lo && a.c_hi == b.c_hi && a.tap == b.tap && a.pix == b.pix;
}

// The coordinate kernel's split before issue 14 (int64 throughout).
df::CoordItem coord_reference(int64_t G, int64_t kk, int64_t P, int64_t t) {
  df::CoordItem i;
  i.pix = t % P;
  t /= P;
  i.tap = t % kk;
  t /= kk;
  i.go = t % G;
  i.b = t / G;
  return i;
}

struct Case {
  int64_t nb, Cin, G, kk, P;
  int64_t kw, Wo;  // tap and pixel grids: kk = kh * kw, P = Ho * Wo
};

void check_case(const Case& c) {
  const int64_t Cg = c.Cin / c.G, HW = 7 * 9, col_step = c.kk * c.P;
  const df::Geometry g{7, 9, c.P / c.Wo, c.Wo, c.kk / c.kw, c.kw, 2, 1, 1, 0, 1, 2};
  std::vector<int> seen(c.nb * c.Cin * c.kk * c.P, 0);
  const int64_t items = df::sample_items(c.nb, c.G, Cg, kChansPerItem, c.kk, c.P);
  for (int64_t t = 0; t < items; ++t) {
    const df::SampleItem it = df::sample_item(c.G, Cg, kChansPerItem, c.kk, c.P, t);
    const df::SampleItem n32 = df::sample_item_as<uint32_t>(static_cast<uint32_t>(c.G), static_cast<uint32_t>(Cg),
                                                            kChansPerItem, static_cast<uint32_t>(c.kk),
                                                            static_cast<uint32_t>(c.P), static_cast<uint32_t>(t));
    const df::SampleItem n64 = df::sample_item_as<int64_t>(c.G, Cg, kChansPerItem, c.kk, c.P, t);
    if (!same(it, n32) || !same(it, n64)) fail("sample_item_as differs from sample_item", t);
    // position(): the pixel and tap split in 32 bits, then origin_y/x, against base_y/base_x.
    const auto o = df::divmod<uint32_t>(static_cast<uint32_t>(it.pix), static_cast<uint32_t>(c.Wo));
    const auto k = df::divmod<uint32_t>(static_cast<uint32_t>(it.tap), static_cast<uint32_t>(c.kw));
    if (df::origin_y(g, o.q, k.q) != g.base_y(it.pix / g.Wo, it.tap) ||
        df::origin_x(g, o.r, k.r) != g.base_x(it.pix % g.Wo, it.tap)) {
      fail("origin_y/x differs from base_y/x", t);
    }
    const bool in_group = it.c_lo >= it.go * Cg && it.c_hi <= (it.go + 1) * Cg && it.c_lo < it.c_hi &&
                          it.c_hi - it.c_lo <= kChansPerItem;
    if (!in_group || it.b < 0 || it.b >= c.nb || it.tap >= c.kk || it.pix >= c.P) {
      fail("item out of range", t);
      continue;
    }
    // The kernels' channel loop: batches of kChanBatch, column and plane advanced by strides.
    const int n = static_cast<int>(it.c_hi - it.c_lo);
    const int64_t col0 = df::column_index(c.Cin, c.kk, c.P, it.b, it.c_lo, it.tap, it.pix);
    const int64_t plane0 = (it.b * c.Cin + it.c_lo) * HW;
    for (int c0 = 0; c0 < n; c0 += kChanBatch) {
      for (int j = 0; j < kChanBatch; ++j) {
        if (c0 + j >= n) continue;
        const int64_t ch = it.c_lo + c0 + j;
        const int64_t col = col0 + (c0 + j) * col_step;
        const int64_t want = ((it.b * c.Cin + ch) * c.kk + it.tap) * c.P + it.pix;
        if (col != df::column_index(c.Cin, c.kk, c.P, it.b, ch, it.tap, it.pix) || col != want ||
            plane0 + (c0 + j) * HW != (it.b * c.Cin + ch) * HW || col < 0 ||
            col >= static_cast<int64_t>(seen.size())) {
          fail("column index", col);
          continue;
        }
        ++seen[col];
      }
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (seen[i] != 1) fail("column not written exactly once", static_cast<long long>(i));
  }
  // The coordinate kernel: one thread per (image, group, tap, pixel), its channel loop in batches.
  const int64_t total = c.nb * c.G * c.kk * c.P;
  std::vector<int> cols(seen.size(), 0);
  for (int64_t t = 0; t < total; ++t) {
    const df::CoordItem ref = coord_reference(c.G, c.kk, c.P, t);
    const df::CoordItem a = df::coord_item<uint32_t>(static_cast<uint32_t>(c.G), static_cast<uint32_t>(c.kk),
                                                     static_cast<uint32_t>(c.P), static_cast<uint32_t>(t));
    const df::CoordItem b = df::coord_item<int64_t>(c.G, c.kk, c.P, t);
    if (a.b != ref.b || a.go != ref.go || a.tap != ref.tap || a.pix != ref.pix || b.b != ref.b || b.go != ref.go ||
        b.tap != ref.tap || b.pix != ref.pix) {
      fail("coord_item differs from the int64 split", t);
      continue;
    }
    const int64_t gcol0 = df::column_index(c.Cin, c.kk, c.P, a.b, a.go * Cg, a.tap, a.pix);
    for (int64_t c0 = 0; c0 < Cg; c0 += kChanBatch) {
      for (int j = 0; j < kChanBatch; ++j) {
        if (c0 + j >= Cg) continue;
        const int64_t ch = a.go * Cg + c0 + j;
        const int64_t col = gcol0 + (c0 + j) * col_step;
        if (col != (((a.b) * c.Cin + ch) * c.kk + a.tap) * c.P + a.pix) {
          fail("coordinate kernel column", t);
          continue;
        }
        ++cols[col];
      }
    }
  }
  for (size_t i = 0; i < cols.size(); ++i) {
    if (cols[i] != 1) fail("coordinate kernel column not read exactly once", static_cast<long long>(i));
  }
}

// corner_base() against corners(): every valid corner k at base + (k / 2) * W + k % 2, and the base
// within [-W - 1, H * W) whenever a corner is valid.
void check_corner_base() {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-3.0f, 12.0f);
  const float special[] = {-2.0f, -1.5f, -1.0f, -0.5f, 0.0f, 0.25f, 5.0f, 5.5f, 6.0f, 6.75f, 7.0f, 8.0f, 9.0f,
                           std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
  const int64_t H = 7, W = 9;
  auto one = [&](float y, float x, bool outer) {
    const df::Corners<float> cn = df::corners(y, x, H, W, outer);
    const int64_t base = df::corner_base(cn, W);
    bool any = false;
    for (int k = 0; k < 4; ++k) {
      if (!cn.valid[k]) continue;
      any = true;
      if (base + (k / 2) * W + k % 2 != cn.idx[k]) fail("corner_base", k);
    }
    if (any && (base < -W - 1 || base >= H * W)) fail("corner_base range", base);
  };
  for (float y : special)
    for (float x : special) {
      one(y, x, true);
      one(y, x, false);
    }
  for (int i = 0; i < 20000; ++i) one(u(rng), u(rng), i % 2 == 0);
}

int main() {
  // kk = kh * kw and P = Ho * Wo; group sizes that are and are not multiples of the channel run
  // and of kChanBatch.
  const Case cases[] = {{2, 4, 1, 9, 36, 3, 6},  {3, 64, 1, 4, 25, 2, 5}, {1, 40, 2, 9, 7, 3, 7},
                        {2, 33, 3, 4, 5, 2, 5},  {1, 16, 16, 1, 3, 1, 3}, {2, 17, 1, 1, 1, 1, 1},
                        {1, 48, 4, 9, 11, 3, 11}, {2, 6, 2, 6, 12, 3, 4}};
  int n = 0;
  for (const Case& c : cases) {
    check_case(c);
    ++n;
  }
  check_corner_base();
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
