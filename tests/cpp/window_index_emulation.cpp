// Checks the per-token form of Swin's relative position index that the CUDA window-attention
// kernels use (relative_pos / relative_offset, window_attention_math.h) against relative_index
// for every query/key pair of many window shapes, and that each index lies inside the bias table.
// Exit status 0 on success.
#include <cstdio>

#include "ops/window_attention/window_attention_math.h"

namespace wn = tokenmix::window_attention;

int main() {
  int failures = 0, n = 0;
  for (int64_t wh = 1; wh <= 16; ++wh) {
    for (int64_t ww = 1; ww <= 16; ++ww) {
      const wn::Geometry g = wn::make_geometry(4 * wh, 3 * ww, wh, ww, 0, 0);
      const int T = static_cast<int>(g.tokens()), off = wn::relative_offset(g);
      for (int i = 0; i < T; ++i) {
        for (int j = 0; j < T; ++j) {
          const int64_t want = wn::relative_index(g, i, j);
          const int got = wn::relative_pos(g, i) - wn::relative_pos(g, j) + off;
          if (got != want || got < 0 || got >= g.table_size()) {
            if (failures++ < 10) {
              std::printf("FAIL %lldx%lld window, tokens %d %d: %d, want %lld\n", (long long)wh,
                          (long long)ww, i, j, got, (long long)want);
            }
          }
        }
      }
      ++n;
    }
  }
  std::printf("%d cases, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
