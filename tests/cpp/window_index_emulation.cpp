// Checks the index math the CUDA window-attention kernels run (window_attention_math.h) against
// the plain formulas it replaces, on the host, in the kernels' own order:
// - the per-token form of Swin's relative position index (relative_pos / relative_offset) against
//   relative_index for every query/key pair of many window shapes, each index inside the table;
// - the bias-table slice staged per block (bias_table_offset) against the direct lookup;
// - shifted_coords in two steps (window_origin once per block, shifted_coords_from per token);
// - the task split (split_task) against / and %;
// - the 16-byte row loads: for every (token, 16-byte piece) the address of each channel equals the
//   scalar path's address of that channel, pieces cover every (token, channel) once, and every
//   piece is 16-byte aligned when rows_aligned16 says so (contiguous, packed qkv, sliced views,
//   global query, shifted and partial windows);
// - the reductions' split of their flat index into (row, rest) without 64-bit division.
// Exit status 0 on success.
#include <cstdio>
#include <vector>

#include "ops/window_attention/window_attention_math.h"

namespace wn = tokenmix::window_attention;

// window_attention_params.h's kDbiasChunk and dbias_chunk_count (that header needs the CUDA
// runtime's; the value must match).
constexpr int64_t kDbiasChunk = 64;

namespace {

int failures = 0;

void fail(const char* what, long long a, long long b, long long c) {
  if (failures++ < 20) std::printf("FAIL %s: %lld %lld %lld\n", what, a, b, c);
}

// Relative index and the staged bias slice, every pair of many window shapes.
int check_relative() {
  int n = 0;
  for (int64_t wh = 1; wh <= 16; ++wh) {
    for (int64_t ww = 1; ww <= 16; ++ww) {
      const wn::Geometry g = wn::make_geometry(4 * wh, 3 * ww, wh, ww, 0, 0);
      const int T = static_cast<int>(g.tokens()), off = wn::relative_offset(g);
      const int64_t heads = 3, table = g.table_size();
      std::vector<float> full(table * heads);
      for (size_t e = 0; e < full.size(); ++e) full[e] = static_cast<float>(e * 7 % 101);
      for (int64_t h = 0; h < heads; ++h) {
        std::vector<float> staged(table);
        for (int64_t r = 0; r < table; ++r) staged[r] = full[wn::bias_table_offset(r, heads, h)];
        for (int i = 0; i < T; ++i) {
          for (int j = 0; j < T; ++j) {
            const int64_t want = wn::relative_index(g, i, j);
            const int got = wn::relative_pos(g, i) - wn::relative_pos(g, j) + off;
            if (got != want || got < 0 || got >= table) fail("relative index", wh * 100 + ww, got, want);
            if (got >= 0 && got < table && staged[got] != full[want * heads + h]) {
              fail("staged bias", wh * 100 + ww, i, j);
            }
          }
        }
      }
      ++n;
    }
  }
  // The tensor-core kernels stage at most 225 entries (tc::kMaxTable): every window of <= 64
  // tokens fits (tensor_cores_cover checks it too).
  for (int64_t wh = 1; wh <= 64; ++wh) {
    for (int64_t ww = 1; wh * ww <= 64; ++ww) {
      const wn::Geometry g = wn::make_geometry(wh, ww, wh, ww, 0, 0);
      if (g.table_size() > 225) fail("table over the tensor-core staging size", wh, ww, g.table_size());
    }
  }
  return n;
}

// Shifted coordinates in two steps, every window and token, shifted and partial windows.
int check_coords() {
  int n = 0;
  for (int64_t H : {1, 5, 7, 14, 15}) {
    for (int64_t W : {1, 6, 7, 21}) {
      for (int64_t wh : {1, 3, 7}) {
        for (int64_t ww : {1, 2, 7}) {
          for (int64_t sh : {int64_t{0}, H / 2}) {
            for (int64_t sw : {int64_t{0}, W / 3}) {
              const wn::Geometry g = wn::make_geometry(H, W, wh, ww, sh, sw);
              for (int64_t win = 0; win < g.windows(); ++win) {
                int64_t oy = 0, ox = 0;
                wn::window_origin(g, win, &oy, &ox);
                for (int t = 0; t < g.tokens(); ++t) {
                  int64_t ay = 0, ax = 0, by = 0, bx = 0;
                  const bool a = wn::shifted_coords(g, win, t, &ay, &ax);
                  const bool b = wn::shifted_coords_from(g, oy, ox, t, &by, &bx);
                  if (a != b || ay != by || ax != bx) fail("shifted coords", win, t, by * 1000 + bx);
                }
              }
              ++n;
            }
          }
        }
      }
    }
  }
  return n;
}

int check_tasks() {
  int n = 0;
  for (int64_t heads : {1, 3, 24}) {
    for (int64_t windows : {1, 4, 64, 3136}) {
      for (int64_t task = 0; task < 5000; task += 7) {
        int64_t b = 0, win = 0, h = 0;
        wn::split_task(task, heads, windows, &b, &win, &h);
        if (h != task % heads || win != (task / heads) % windows || b != task / (heads * windows)) {
          fail("task split", task, heads, windows);
        }
        ++n;
      }
    }
  }
  return n;
}

// A tensor as the kernels see it: strides of dims 0-3 (elements, channel stride 1) and the byte
// address of element 0.
struct View {
  int64_t sb, sy, sx, sh;
  uint64_t address;
};

// The scalar path's element offset of channel c of (b, y, x, h), as the kernels wrote it before the
// per-block row bases: b * stride_b + y * stride_y + x * stride_x + h * stride_h + c.
int64_t scalar_offset(const View& v, int64_t b, int64_t y, int64_t x, int64_t h, int64_t c) {
  return b * v.sb + y * v.sy + x * v.sx + h * v.sh + c;
}

// Every (token, 16-byte piece) of window win, image b, head h: the vector path's address of
// each channel equals the scalar path's; the pieces cover every (token, channel) once; pieces are
// aligned where rows_aligned16 promises it. The token's row is the map position of its window
// token, or for a global query its position in the window.
void check_pieces(const wn::Geometry& g, const View& v, int64_t elem, int64_t d, int64_t heads,
                  bool global_q, int64_t b, int64_t win, int64_t h) {
  const int vec = static_cast<int>(16 / elem);
  const int T = static_cast<int>(g.tokens());
  const bool aligned = wn::rows_aligned16(v.address, elem, d, v.sb, v.sy, v.sx, v.sh);
  if (d % vec != 0) return;  // rows_aligned16 is false: the scalar path runs
  int64_t oy = 0, ox = 0;
  wn::window_origin(g, win, &oy, &ox);
  const int64_t base = b * v.sb + h * v.sh;
  std::vector<int> seen(T * d, 0);
  const int pieces = static_cast<int>(T * d / vec);
  for (int n = 0; n < pieces; ++n) {
    int t = 0, c0 = 0;
    wn::vector_piece(n, static_cast<int>(d), vec, &t, &c0);
    if (t < 0 || t >= T || c0 < 0 || c0 + vec > d || c0 % vec != 0) {
      fail("piece outside the window", n, t, c0);
      continue;
    }
    int64_t y = 0, x = 0;
    if (global_q) {
      const int ww = static_cast<int>(g.ww);
      const int qy = t / ww;
      y = qy;
      x = t - qy * ww;
    } else {
      int64_t sy = 0, sx = 0;
      if (!wn::shifted_coords_from(g, oy, ox, t, &sy, &sx)) continue;  // no row to load
      y = wn::original_row(g, sy);
      x = wn::original_col(g, sx);
    }
    const int64_t row = wn::row_offset(base, v.sy, v.sx, y, x);
    if (aligned && (v.address + static_cast<uint64_t>((row + c0) * elem)) % 16 != 0) {
      fail("misaligned piece", n, row, c0);
    }
    for (int i = 0; i < vec; ++i) {
      // The scalar path's element e = t * d + c of the window's [T, d] rows.
      const int e = t * static_cast<int>(d) + c0 + i;
      const int64_t ys = global_q ? (e / d) / g.ww : y, xs = global_q ? (e / d) % g.ww : x;
      const int64_t want = scalar_offset(v, b, ys, xs, h, e % d);
      if (row + c0 + i != want) fail("piece address", n, row + c0 + i, want);
      ++seen[e];
    }
  }
  for (int t = 0; t < T; ++t) {
    int64_t sy = 0, sx = 0;
    const bool loaded = global_q || wn::shifted_coords_from(g, oy, ox, t, &sy, &sx);
    for (int c = 0; c < d; ++c) {
      if (seen[t * d + c] != (loaded ? 1 : 0)) fail("piece coverage", t, c, seen[t * d + c]);
    }
  }
  (void)heads;
}

int check_vector_rows() {
  int n = 0;
  struct Shape {
    int64_t H, W, wh, ww, sh, sw;
  };
  const Shape shapes[] = {{14, 14, 7, 7, 0, 0}, {14, 14, 7, 7, 3, 3}, {7, 7, 7, 7, 0, 0},
                          {9, 11, 7, 7, 0, 0},  {8, 8, 8, 8, 4, 4},   {5, 13, 2, 4, 0, 0},
                          {6, 6, 3, 2, 1, 1}};
  for (const Shape& s : shapes) {
    const wn::Geometry g = wn::make_geometry(s.H, s.W, s.wh, s.ww, s.sh, s.sw);
    for (int64_t elem : {2, 4, 8}) {
      for (int64_t d : {8, 16, 24, 32, 40, 64}) {
        for (int64_t heads : {1, 3}) {
          const int64_t B = 2;
          int64_t cb = 0, cy = 0, cx = 0, ch = 0;
          wn::contiguous_strides(g, heads, d, &cb, &cy, &cx, &ch);
          const uint64_t base_addr = 4096;
          std::vector<std::pair<View, bool>> views;
          views.push_back({{cb, cy, cx, ch}, false});  // contiguous
          // k of a packed [B, H, W, 3, heads, d] qkv: rows 3 heads * d apart, offset heads * d.
          views.push_back({{3 * cb, 3 * cy, 3 * cx, ch, base_addr + uint64_t(heads * d * elem)}, false});
          // A channel slice [..., 1:d+1] of a d+1-channel tensor: rows never aligned.
          views.push_back({{cb / d * (d + 1), cy / d * (d + 1), cx / d * (d + 1), d + 1,
                            base_addr + uint64_t(elem)},
                           false});
          // A global query [B, wh, ww, heads, d].
          views.push_back({{g.wh * g.ww * heads * d, g.ww * heads * d, heads * d, d, base_addr}, true});
          views[0].first.address = base_addr;
          for (const auto& [v, global_q] : views) {
            for (int64_t b = 0; b < B; ++b) {
              for (int64_t win = 0; win < g.windows(); ++win) {
                for (int64_t h = 0; h < heads; ++h) {
                  check_pieces(g, v, elem, d, heads, global_q, b, win, h);
                }
              }
            }
            ++n;
          }
          // The contiguous map rows (grad, out) with the kernels' per-block bases.
          for (int64_t b = 0; b < B; ++b) {
            for (int64_t h = 0; h < heads; ++h) {
              for (int64_t y = 0; y < g.H; ++y) {
                for (int64_t x = 0; x < g.W; ++x) {
                  const int64_t got = wn::row_offset(b * cb + h * ch, cy, cx, y, x);
                  const int64_t want = (((b * g.H + y) * g.W + x) * heads + h) * d;
                  if (got != want) fail("map row", b, y * 1000 + x, h);
                }
              }
            }
          }
        }
      }
    }
  }
  // rows_aligned16 refuses what would misalign: odd base, strides, head dims, 16 % elem != 0.
  if (wn::rows_aligned16(4098, 2, 32, 0, 0, 0, 0)) fail("aligned16 base", 4098, 2, 32);
  if (wn::rows_aligned16(4096, 2, 32, 0, 0, 36, 0)) fail("aligned16 stride", 4096, 2, 36);
  if (wn::rows_aligned16(4096, 2, 12, 0, 0, 0, 0)) fail("aligned16 d", 4096, 2, 12);
  if (wn::rows_aligned16(4096, 3, 48, 0, 0, 0, 0)) fail("aligned16 elem", 4096, 3, 48);
  if (!wn::rows_aligned16(4096, 4, 32, 4096, 512, 128, 32)) fail("aligned16 ok", 4096, 4, 32);
  return n;
}

// The reduction kernels of window_attention_reduce.cu, their loops run on the host with small
// grids (so that the grid-stride loops take several turns): every output is the sum of the same
// partials, in the same order, as the flat-index formulas with division they replace.
struct Grid {
  int64_t blocks_x, threads, blocks_y;
};

int check_reductions() {
  int n = 0;
  for (int64_t heads : {1, 3}) {
    for (int64_t table : {1, 9, 169}) {
      for (int64_t blocks : {1, 63, 64, 130}) {
        for (const Grid grid : {Grid{1, 4, 1}, Grid{2, 32, 2}, Grid{3, 64, 5}}) {
          const int64_t entries = table * heads, chunks_n = (blocks + kDbiasChunk - 1) / kDbiasChunk;
          std::vector<double> part(blocks * entries), chunks(chunks_n * entries, -1.0);
          for (size_t e = 0; e < part.size(); ++e) part[e] = 1.0 / static_cast<double>(e + 3);
          // dbias_chunk_kernel.
          for (int64_t by = 0; by < grid.blocks_y; ++by) {
            for (int64_t tx = 0; tx < grid.blocks_x * grid.threads; ++tx) {
              for (int64_t chunk = by; chunk < chunks_n; chunk += grid.blocks_y) {
                const int64_t lo = chunk * kDbiasChunk;
                const int64_t hi = lo + kDbiasChunk < blocks ? lo + kDbiasChunk : blocks;
                for (int64_t e = tx; e < entries; e += grid.blocks_x * grid.threads) {
                  const double* src = part.data() + lo * entries + e;
                  double sum = 0;
                  for (int64_t bw = lo; bw < hi; ++bw, src += entries) sum += *src;
                  chunks[chunk * entries + e] = sum;
                }
              }
            }
          }
          // The flat-index version it replaces.
          for (int64_t e = 0; e < chunks_n * entries; ++e) {
            const int64_t r = e % table, h = (e / table) % heads, chunk = e / (table * heads);
            const int64_t lo = chunk * kDbiasChunk;
            const int64_t hi = lo + kDbiasChunk < blocks ? lo + kDbiasChunk : blocks;
            double sum = 0;
            for (int64_t bw = lo; bw < hi; ++bw) sum += part[(bw * heads + h) * table + r];
            if (chunks[e] != sum) fail("dbias chunk", e, heads, table);
          }
          // dbias_reduce_kernel: x over table rows, y over heads.
          std::vector<double> dbias(table * heads, -1.0);
          for (int64_t by = 0; by < grid.blocks_y; ++by) {
            for (int64_t tx = 0; tx < grid.blocks_x * grid.threads; ++tx) {
              for (int64_t h = by; h < heads; h += grid.blocks_y) {
                for (int64_t r = tx; r < table; r += grid.blocks_x * grid.threads) {
                  const double* src = chunks.data() + h * table + r;
                  double sum = 0;
                  for (int64_t c = 0; c < chunks_n; ++c, src += entries) sum += *src;
                  dbias[r * heads + h] = sum;
                }
              }
            }
          }
          for (int64_t e = 0; e < table * heads; ++e) {
            const int64_t r = e % table, h = e / table;
            double sum = 0;
            for (int64_t c = 0; c < chunks_n; ++c) sum += chunks[(c * heads + h) * table + r];
            if (dbias[r * heads + h] != sum) fail("dbias reduce", e, heads, table);
          }
          ++n;
        }
      }
    }
  }
  // dq_reduce_kernel, scalar and kVec-wide: y over images, x over an image's values.
  for (int64_t per_image : {4, 12, 96, 200}) {
    for (int64_t nW : {1, 4}) {
      for (int vec : {1, 2, 4}) {
        if (per_image % vec != 0) continue;
        for (const Grid grid : {Grid{1, 4, 1}, Grid{3, 8, 2}}) {
          const int64_t B = 3;
          std::vector<double> part(B * nW * per_image), dq(B * per_image, -1.0);
          std::vector<int> writes(dq.size(), 0);
          for (size_t e = 0; e < part.size(); ++e) part[e] = 1.0 / static_cast<double>(e + 5);
          for (int64_t by = 0; by < grid.blocks_y; ++by) {
            for (int64_t tx = 0; tx < grid.blocks_x * grid.threads; ++tx) {
              for (int64_t b = by; b < B; b += grid.blocks_y) {
                const double* src = part.data() + b * nW * per_image;
                double* dst = dq.data() + b * per_image;
                for (int64_t i = tx * vec; i < per_image; i += grid.blocks_x * grid.threads * vec) {
                  for (int k = 0; k < vec; ++k) {
                    double sum = 0;
                    for (int64_t w = 0; w < nW; ++w) sum += src[w * per_image + i + k];
                    dst[i + k] = sum;
                    ++writes[b * per_image + i + k];
                  }
                }
              }
            }
          }
          for (int64_t e = 0; e < B * per_image; ++e) {
            const int64_t b = e / per_image, rest = e % per_image;
            double sum = 0;
            for (int64_t w = 0; w < nW; ++w) sum += part[(b * nW + w) * per_image + rest];
            if (dq[e] != sum || writes[e] != 1) fail("dq reduce", e, per_image, vec);
          }
          ++n;
        }
      }
    }
  }
  return n;
}

}  // namespace

int main() {
  const int rel = check_relative();
  const int coords = check_coords();
  const int tasks = check_tasks();
  const int vec = check_vector_rows();
  const int red = check_reductions();
  std::printf("%d window shapes, %d geometries, %d tasks, %d views, %d reductions, %d failures\n",
              rel, coords, tasks, vec, red, failures);
  return failures == 0 ? 0 : 1;
}
