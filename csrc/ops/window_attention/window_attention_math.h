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

// shifted_coords in two steps, for kernels: the shifted-map row and column of window win's first
// token (64-bit, once per block), to which token t adds (t / ww, t % ww) in 32-bit (window-local).
// shifted_coords(g, win, t) == (oy + t / ww, ox + t % ww).
TM_HOST_DEVICE void window_origin(const Geometry& g, int64_t win, int64_t* oy, int64_t* ox) {
  const int64_t wr = win / g.nww;
  *oy = wr * g.wh;
  *ox = (win - wr * g.nww) * g.ww;
}
TM_HOST_DEVICE bool shifted_coords_from(const Geometry& g, int64_t oy, int64_t ox, int t,
                                        int64_t* sy, int64_t* sx) {
  const int ww = static_cast<int>(g.ww);
  const int r = t / ww;
  *sy = oy + r;
  *sx = ox + (t - r * ww);
  return *sy < g.H && *sx < g.W;
}

// Element offset of the row (y, x) of a tensor with channel stride 1, given base = b * stride_b +
// h * stride_h (once per block) and the row strides. Both the scalar and the 16-byte load paths
// of the kernels address rows with it: channel c of the row is at row_offset(...) + c.
TM_HOST_DEVICE int64_t row_offset(int64_t base, int64_t sy, int64_t sx, int64_t y, int64_t x) {
  return base + y * sy + x * sx;
}

// Whether every row of a tensor (channel stride 1, head_dim d) starts on a 16-byte boundary, so
// that its channels can be read 16 bytes at a time: the base address and every stride of dims
// 0-3 (elements) are multiples of 16 bytes, and so is d.
TM_HOST_DEVICE bool rows_aligned16(uint64_t address, int64_t elem_bytes, int64_t d, int64_t sb,
                                   int64_t sy, int64_t sx, int64_t sh) {
  if (16 % elem_bytes != 0) return false;
  const int64_t vec = 16 / elem_bytes;
  return address % 16 == 0 && d % vec == 0 && sb % vec == 0 && sy % vec == 0 && sx % vec == 0 &&
         sh % vec == 0;
}

// The n-th 16-byte piece (vec elements) of a window's [tokens, d] rows, pieces numbered row-major:
// its token and first channel. d is a multiple of vec (rows_aligned16).
TM_HOST_DEVICE void vector_piece(int n, int d, int vec, int* t, int* c0) {
  const int per_row = d / vec;
  *t = n / per_row;
  *c0 = (n - *t * per_row) * vec;
}

// A kernel task (b * windows + win) * heads + h split into its image, window and head with two
// 64-bit divisions (once per block).
TM_HOST_DEVICE void split_task(int64_t task, int64_t heads, int64_t windows, int64_t* b,
                               int64_t* win, int64_t* h) {
  const int64_t bw = task / heads;
  *h = task - bw * heads;
  *b = bw / windows;
  *win = bw - *b * windows;
}

// Strides (elements) of dims 0-3 of a contiguous [B, H, W, heads, d] tensor.
TM_HOST_DEVICE void contiguous_strides(const Geometry& g, int64_t heads, int64_t d, int64_t* sb,
                                       int64_t* sy, int64_t* sx, int64_t* sh) {
  *sh = d;
  *sx = heads * d;
  *sy = g.W * *sx;
  *sb = g.H * *sy;
}

// Entry r of head h's slice of a [table, heads] bias table (what the kernels stage in shared
// memory once per block; a pair's entry is then relative_pos(q) - relative_pos(k) +
// relative_offset).
TM_HOST_DEVICE int64_t bias_table_offset(int64_t r, int64_t heads, int64_t h) {
  return r * heads + h;
}

}  // namespace window_attention
}  // namespace tokenmix
