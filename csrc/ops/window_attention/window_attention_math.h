// Index math of windowed attention (Swin W-MSA / SW-MSA, GC ViT, HAT-Net local windows), shared
// by the CPU and CUDA kernels. No roll, pad, partition or reverse is ever materialised: a window
// token is mapped to its position in the original map here. No torch headers.
#pragma once

#include <cstdint>

#include "tokenmix/macros.h"

namespace tokenmix {
namespace window_attention {

// A [B, H, W, heads, d] map cut into windows of wh x ww after a cyclic shift by (-sh, -sw).
// Windows tile the shifted map from the top-left; when H or W is not a multiple of the window
// (only allowed without shift) the last row/column of windows is partial.
struct Geometry {
  int64_t H, W;    // map
  int64_t wh, ww;  // window
  int64_t sh, sw;  // shift, 0 <= sh < H, 0 <= sw < W
  int64_t nwh, nww;  // windows per column / row: ceil(H / wh), ceil(W / ww)

  TM_HOST_DEVICE int64_t tokens() const { return wh * ww; }
  TM_HOST_DEVICE int64_t windows() const { return nwh * nww; }
  TM_HOST_DEVICE int64_t table_size() const { return (2 * wh - 1) * (2 * ww - 1); }
};

TM_HOST_DEVICE Geometry make_geometry(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh,
                                      int64_t sw) {
  return Geometry{H, W, wh, ww, sh, sw, (H + wh - 1) / wh, (W + ww - 1) / ww};
}

// Token t (row-major inside the window) of window `win` (row-major over windows): its row and
// column in the shifted map; false when it falls outside the map (partial border window).
TM_HOST_DEVICE bool shifted_coords(const Geometry& g, int64_t win, int64_t t, int64_t* sy,
                                   int64_t* sx) {
  *sy = (win / g.nww) * g.wh + t / g.ww;
  *sx = (win % g.nww) * g.ww + t % g.ww;
  return *sy < g.H && *sx < g.W;
}

// Shifted-map coordinates -> original map: the cyclic shift by (-sh, -sw) moved the token at
// (y, x) to ((y - sh) mod H, (x - sw) mod W), so the inverse adds the shift back.
TM_HOST_DEVICE int64_t original_row(const Geometry& g, int64_t sy) {
  const int64_t y = sy + g.sh;
  return y >= g.H ? y - g.H : y;
}
TM_HOST_DEVICE int64_t original_col(const Geometry& g, int64_t sx) {
  const int64_t x = sx + g.sw;
  return x >= g.W ? x - g.W : x;
}

// Swin's region label of a shifted-map position: rows [0, H - wh), [H - wh, H - sh), [H - sh, H)
// (columns alike) are separate regions, so tokens that the roll brought together from opposite
// borders do not attend to each other. Without shift in a dimension it has a single region.
TM_HOST_DEVICE int region_1d(int64_t s, int64_t size, int64_t win, int64_t shift) {
  if (shift == 0) return 0;
  return s < size - win ? 0 : (s < size - shift ? 1 : 2);
}
TM_HOST_DEVICE int region(const Geometry& g, int64_t sy, int64_t sx) {
  return region_1d(sy, g.H, g.wh, g.sh) * 3 + region_1d(sx, g.W, g.ww, g.sw);
}

// Swin's relative position index of query token tq and key token tk of one window:
// (dy + wh - 1) * (2 ww - 1) + (dx + ww - 1), with (dy, dx) = query - key.
TM_HOST_DEVICE int64_t relative_index(const Geometry& g, int64_t tq, int64_t tk) {
  const int64_t dy = tq / g.ww - tk / g.ww;
  const int64_t dx = tq % g.ww - tk % g.ww;
  return (dy + g.wh - 1) * (2 * g.ww - 1) + (dx + g.ww - 1);
}

// relative_index split into per-token terms, so a kernel computes each token's term once and a
// pair's index is one subtraction: relative_index(g, q, k) ==
// relative_pos(g, q) - relative_pos(g, k) + relative_offset(g), since the index is linear in
// (dy, dx). Window-local, so int.
TM_HOST_DEVICE int relative_pos(const Geometry& g, int t) {
  const int ww = static_cast<int>(g.ww);
  return (t / ww) * (2 * ww - 1) + t % ww;
}
TM_HOST_DEVICE int relative_offset(const Geometry& g) {
  return static_cast<int>((g.wh - 1) * (2 * g.ww - 1) + (g.ww - 1));
}

}  // namespace window_attention
}  // namespace tokenmix
