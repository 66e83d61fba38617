// Enumerates the work items of deform_conv2d's CUDA sampling kernels (im2col, col2im) on the host,
// exactly as the kernels number them, and checks that together they address every column of the
// chunk exactly once, each with the image, channel, tap and pixel that column stands for, and a
// channel inside the item's offset group. Exit status 0 on success.
#include <cstdio>
#include <vector>

#include "ops/deform_conv2d/deform_conv2d_math.h"

namespace df = tokenmix::deform_conv2d;

constexpr int64_t kChansPerItem = 16;  // as in deform_conv2d_cuda.cu

int main() {
  struct Case {
    int64_t nb, Cin, G, kk, P;
  };
  const Case cases[] = {{2, 4, 1, 9, 36}, {3, 64, 1, 4, 25}, {1, 40, 2, 9, 7}, {2, 33, 3, 4, 5},
                        {1, 16, 16, 1, 3}, {2, 17, 1, 1, 1}, {1, 48, 4, 9, 11}};
  int failures = 0, n = 0;
  for (const Case& c : cases) {
    const int64_t Cg = c.Cin / c.G;
    std::vector<int> seen(c.nb * c.Cin * c.kk * c.P, 0);
    const int64_t items = df::sample_items(c.nb, c.G, Cg, kChansPerItem, c.kk, c.P);
    for (int64_t t = 0; t < items; ++t) {
      const df::SampleItem it = df::sample_item(c.G, Cg, kChansPerItem, c.kk, c.P, t);
      const bool in_group = it.c_lo >= it.go * Cg && it.c_hi <= (it.go + 1) * Cg && it.c_lo < it.c_hi &&
                            it.c_hi - it.c_lo <= kChansPerItem;
      if (!in_group || it.b < 0 || it.b >= c.nb || it.tap >= c.kk || it.pix >= c.P) {
        if (failures++ < 10) std::printf("FAIL item %lld out of range\n", (long long)t);
        continue;
      }
      for (int64_t ch = it.c_lo; ch < it.c_hi; ++ch) {
        const int64_t col = df::column_index(c.Cin, c.kk, c.P, it.b, ch, it.tap, it.pix);
        const int64_t want = ((it.b * c.Cin + ch) * c.kk + it.tap) * c.P + it.pix;
        if (col != want || col < 0 || col >= static_cast<int64_t>(seen.size())) {
          if (failures++ < 10) std::printf("FAIL column index %lld\n", (long long)col);
          continue;
        }
        ++seen[col];
      }
    }
    for (size_t i = 0; i < seen.size(); ++i) {
      if (seen[i] != 1 && failures++ < 10) std::printf("FAIL column %zu written %d times\n", i, seen[i]);
    }
    ++n;
  }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
