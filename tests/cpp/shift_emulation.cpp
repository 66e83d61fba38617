// Host emulation of the index math of the shift family's CUDA kernels (shift_cuda.cu,
// shift_gemm.cu): every work item's decomposition (split once, then advanced by mixed-radix adds;
// channels decomposed once per tile row) is checked against source_offset / fold_grid_pos, the
// functions the CPU path uses, and every output element is checked to be written exactly once.
// The vector items of gather / unfold are checked to be exactly the V scalar reads they replace.
// Torch-free: g++ -std=c++17 -I csrc -I csrc/include tests/cpp/shift_emulation.cpp
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "ops/shift/shift_math.h"

using namespace tokenmix::shift;

namespace {

int64_t g_checks = 0, g_failures = 0;
// Vector items seen: gather runs along columns / channels, gather items copied one by one,
// unfold vectors. Each must be exercised.
int64_t g_run_w = 0, g_run_c = 0, g_run_scalar = 0, g_unfold_vec = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    if (++g_failures <= 20) std::printf("FAIL: %s\n", what.c_str());
  }
}

// A [B, C, H, W] tensor's strides: contiguous NCHW or channels_last.
Strides4 strides(int64_t C, int64_t H, int64_t W, bool cl) {
  if (cl) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

struct Case {
  std::string name;
  TokenMap map;
  std::vector<int64_t> table;  // backs map.dyx
};

Case shift_case(int64_t C, int64_t H, int64_t W, bool circular, int group, int64_t seed) {
  Case c;
  c.name = "shift C" + std::to_string(C) + " H" + std::to_string(H) + " W" + std::to_string(W) +
           (circular ? " circ" : " zero") + " g" + std::to_string(group);
  c.table.resize(2 * C);
  for (int64_t k = 0; k < C; ++k) {
    const int64_t gk = k / group;
    // Raw shifts from -3 n to 3 n: larger than the map, negative, zero.
    const int64_t dy = ((gk * 7 + seed) % 13 - 6) * (H + 1) / 2;
    const int64_t dx = ((gk * 5 + seed * 3) % 11 - 5) * (W + 2) / 3;
    c.table[2 * k] = normalise_shift(dy, H, circular);
    c.table[2 * k + 1] = normalise_shift(dx, W, circular);
  }
  TokenMap& m = c.map;
  m = TokenMap{};
  m.kind = MapKind::Shift;
  m.C = C;
  m.H = H;
  m.W = W;
  m.circular = circular;
  return c;
}

Case fold_case(int64_t C, int64_t H, int64_t W, int axis, int64_t p, int64_t s, bool wrap) {
  Case c;
  c.name = "fold C" + std::to_string(C) + " H" + std::to_string(H) + " W" + std::to_string(W) +
           " axis" + std::to_string(axis) + " p" + std::to_string(p) + " s" + std::to_string(s) +
           (wrap ? " wrap" : " crop");
  TokenMap& m = c.map;
  m = TokenMap{};
  m.kind = MapKind::Fold;
  m.C = C;
  m.H = H;
  m.W = W;
  m.axis = axis;
  m.p = p;
  m.L = axis == 2 ? H : W;
  m.s = s % m.L;
  m.Lp = (m.L + p - 1) / p * p;
  m.wrap = wrap;
  return c;
}

Case identity_case(int64_t C, int64_t H, int64_t W) {
  Case c;
  c.name = "identity C" + std::to_string(C);
  c.map = TokenMap{};
  c.map.kind = MapKind::Identity;
  c.map.C = C;
  c.map.H = H;
  c.map.W = W;
  return c;
}

bool same(const MapChannel& a, const MapChannel& b) {
  return a.coff == b.coff && a.a == b.a && a.b == b.b;
}

// map_channel / map_offset / the channel digits against source_offset, every grid element.
void check_split(const TokenMap& m, const Strides4& st, int64_t B, const std::string& n) {
  const int64_t K = m.K(), GH = m.GH(), GW = m.GW();
  const uint32_t rp = map_region<uint32_t>(m);
  for (int64_t k = 0; k < K; ++k) {
    const MapChannel c32 = map_channel<uint32_t>(m, st, static_cast<uint32_t>(k));
    const MapChannel c64 = map_channel<int64_t>(m, st, k);
    const MapChannel cd =
        map_channel_of<uint32_t>(m, st, split_channel<uint32_t>(static_cast<uint32_t>(k), rp));
    check(same(c32, c64) && same(c32, cd), n + " map_channel k=" + std::to_string(k));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t gy = 0; gy < GH; ++gy)
        for (int64_t gx = 0; gx < GW; ++gx) {
          const int64_t want = source_offset(m, st, b, k, gy, gx);
          check(map_offset(m, st, c32, b * st.b, gy, gx) == want, n + " map_offset");
        }
  }
  if (m.kind == MapKind::Fold) {
    for (int64_t c = 0; c < m.C; ++c)
      for (int64_t t = 0; t < m.Lp; ++t) {
        const GridPos a = fold_grid_pos(m, c, t, 3);
        const GridPos b = fold_grid_pos_i<uint32_t>(m, static_cast<uint32_t>(c),
                                                    static_cast<uint32_t>(t), 3);
        const GridPos d = fold_grid_pos_i<int64_t>(m, c, t, 3);
        check(a.k == b.k && a.gy == b.gy && a.gx == b.gx && a.k == d.k && a.gy == d.gy &&
                  a.gx == d.gx,
              n + " fold_grid_pos_i");
      }
  }
}

// linear_kernel: tiles of 64 pixels x 64 rows, 256 threads; the operand rows' channel digits
// advanced by 4 and 16, the store's pixels and rows by 16; each output written exactly once.
void check_linear(const TokenMap& in, const TokenMap& out, const Strides4& ost, int64_t B,
                  int64_t J, const std::string& n) {
  const int64_t GH = in.GH(), GW = in.GW(), K = in.K();
  const int64_t N = B * GH * GW;
  const uint32_t gh = static_cast<uint32_t>(GH), gw = static_cast<uint32_t>(GW);
  const uint32_t rp = map_region<uint32_t>(in), op = map_region<uint32_t>(out);
  std::map<int64_t, int> writes;
  for (int64_t n0 = 0; n0 < N; n0 += 64)
    for (int64_t j0 = 0; j0 < J; j0 += 64)
      for (int tid = 0; tid < 256; ++tid) {
        const int ln = tid % 64, lk = tid / 64, tx = tid % 16, ty = tid / 16;
        const bool n_ok = n0 + ln < N;
        const PixelOf<uint32_t> q =
            split_pixel<uint32_t>(n_ok ? static_cast<uint32_t>(n0 + ln) : 0u, gh, gw);
        if (n_ok) {
          const int64_t nn = n0 + ln;
          check(q.b == nn / (GH * GW) && q.gy == nn % (GH * GW) / GW && q.gx == nn % GW,
                n + " linear split_pixel");
        }
        if (j0 == 0 && n0 == 0) {
          ChannelDigits<uint32_t> kd = split_channel<uint32_t>(static_cast<uint32_t>(lk), rp);
          const ChannelDigits<uint32_t> d4 = split_channel<uint32_t>(4u, rp),
                                        d16 = split_channel<uint32_t>(16u, rp);
          for (int64_t k0 = 0; k0 < K; k0 += 16) {
            ChannelDigits<uint32_t> d = kd;
            for (int i = 0; i < 4; ++i) {
              const int64_t k = k0 + lk + 4 * i;
              if (i > 0) advance_channel<uint32_t>(d, d4, rp);
              check(d.c == k / rp && d.kk == k % rp, n + " linear channel digits");
            }
            advance_channel<uint32_t>(kd, d16, rp);
          }
        }
        const PixelOf<uint32_t> n16 = split_pixel<uint32_t>(16u, gh, gw);
        PixelOf<uint32_t> r = split_pixel<uint32_t>(static_cast<uint32_t>(n0 + tx), gh, gw);
        for (int c = 0; c < 4; ++c) {
          if (c > 0) advance_pixel<uint32_t>(r, n16, gh, gw);
          const int64_t nn = n0 + tx + 16 * c;
          if (nn >= N) continue;
          check(r.b == nn / (GH * GW) && r.gy == nn % (GH * GW) / GW && r.gx == nn % GW,
                n + " linear store pixel");
          const ChannelDigits<uint32_t> o16 = split_channel<uint32_t>(16u, op);
          ChannelDigits<uint32_t> jd = split_channel<uint32_t>(static_cast<uint32_t>(j0 + ty), op);
          for (int i = 0; i < 4; ++i) {
            if (i > 0) advance_channel<uint32_t>(jd, o16, op);
            const int64_t j = j0 + ty + 16 * i;
            if (j >= J) continue;
            const MapChannel ch = map_channel_of<uint32_t>(out, ost, jd);
            const int64_t o = map_offset(out, ost, ch, r.b * ost.b, r.gy, r.gx);
            check(o == source_offset(out, ost, r.b, j, r.gy, r.gx), n + " linear store offset");
            if (o >= 0) ++writes[o];
          }
        }
      }
  // Every element of out_map's source [B, C, H, W] written exactly once (the maps here are
  // bijections onto it, the dropped padding aside).
  bool ok = static_cast<int64_t>(writes.size()) == B * out.C * out.H * out.W;
  for (const auto& w : writes) ok = ok && w.second == 1;
  check(ok, n + " linear writes once");
}

// weight_grad_kernel: chunk bounds z N / chunks, 16-pixel steps, thread pixel ln advanced by 16;
// both index types.
template <typename I>
void check_weight_grad(int64_t B, int64_t GH, int64_t GW, int64_t chunks, const std::string& n) {
  const int64_t N = B * GH * GW;
  const I gh = static_cast<I>(GH), gw = static_cast<I>(GW);
  std::vector<int> seen(N, 0);
  for (int64_t z = 0; z < chunks; ++z) {
    const int64_t nb0 = z * N / chunks, ne = (z + 1) * N / chunks;
    for (int ln = 0; ln < 16; ++ln) {
      PixelOf<I> q = split_pixel<I>(static_cast<I>(nb0 + ln), gh, gw);
      const PixelOf<I> step = split_pixel<I>(I(16), gh, gw);
      for (int64_t nb = nb0; nb < ne; nb += 16) {
        const int64_t nn = nb + ln;
        if (nn < ne) {
          check(q.b == nn / (GH * GW) && q.gy == nn % (GH * GW) / GW && q.gx == nn % GW,
                n + " weight_grad pixel");
          ++seen[nn];
        }
        advance_pixel<I>(q, step, gh, gw);
      }
    }
  }
  bool ok = true;
  for (int v : seen) ok = ok && v == 1;
  check(ok, n + " weight_grad pixels once");
}

// The launch of launch_walk: items of v elements, digits (d3 / v, d2, d1) or channels fastest
// (d1 / v, d3, d2); the grid stride is split once and added. visit(b, c, h, w) per item.
template <typename Visit>
void walk(int64_t B, int64_t d1, int64_t d2, int64_t d3, bool cf, int64_t v, int64_t stride,
          const std::string& n, Visit visit) {
  const int64_t items = B * d1 * d2 * d3 / v;
  const uint32_t r0 = static_cast<uint32_t>(cf ? d1 / v : d3 / v);
  const uint32_t r1 = static_cast<uint32_t>(cf ? d3 : d2), r2 = static_cast<uint32_t>(cf ? d2 : d1);
  const Digits4<uint32_t> st = split_digits<uint32_t>(static_cast<uint32_t>(stride), r0, r1, r2);
  for (int64_t t0 = 0; t0 < stride; ++t0) {
    uint32_t t = static_cast<uint32_t>(t0);
    Digits4<uint32_t> q = split_digits<uint32_t>(t, r0, r1, r2);
    for (; t < items; t += static_cast<uint32_t>(stride)) {
      const Digits4<uint32_t> want = split_digits<uint32_t>(t, r0, r1, r2);
      check(q.d[0] == want.d[0] && q.d[1] == want.d[1] && q.d[2] == want.d[2] &&
                q.d[3] == want.d[3],
            n + " walk digits");
      const Digits4<int64_t> w64 = split_digits<int64_t>(t, r0, r1, r2);
      check(w64.d[0] == want.d[0] && w64.d[3] == want.d[3], n + " walk digits int64");
      if (cf) {
        visit(q.d[3], q.d[0] * v, q.d[2], q.d[1]);
      } else {
        visit(q.d[3], q.d[2], q.d[1], q.d[0] * v);
      }
      advance_digits<uint32_t>(q, st, r0, r1, r2);
    }
  }
}

// gather_kernel for one vector width v (1: scalar).
void check_gather(const TokenMap& m, int64_t B, bool cl, int64_t v, int64_t stride,
                  const std::string& n) {
  const int64_t K = m.K(), GH = m.GH(), GW = m.GW();
  const Strides4 ss = strides(m.C, m.H, m.W, cl), os = strides(K, GH, GW, cl);
  const bool cf = os.c < os.w;
  if (v > 1 && !gather_vector_ok(m, ss, os, cf, v)) return;
  std::vector<int> writes(B * K * GH * GW, 0);
  walk(B, K, GH, GW, cf, v, stride, n, [&](int64_t b, int64_t k, int64_t gy, int64_t gx) {
    const MapChannel ch = map_channel<uint32_t>(m, ss, static_cast<uint32_t>(k));
    const bool run = v > 1 ? gather_item_is_run(m, ch, k, cf, v) : m.kind == MapKind::Identity;
    if (v > 1) ++(run ? (cf ? g_run_c : g_run_w) : g_run_scalar);
    const int64_t o0 = map_offset(m, ss, ch, b * ss.b, gy, gx);
    const int64_t out0 = b * os.b + k * os.c + gy * os.h + gx * os.w;
    if (v > 1) check(out0 % v == 0 && (!run || o0 < 0 || o0 % v == 0), n + " gather aligned");
    for (int64_t e = 0; e < v; ++e) {
      const int64_t kk = cf ? k + e : k, xx = cf ? gx : gx + e;
      const int64_t want = source_offset(m, ss, b, kk, gy, xx);
      const int64_t dst = b * os.b + kk * os.c + gy * os.h + xx * os.w;
      if (run) {
        check(want == (o0 < 0 ? -1 : o0 + e) && dst == out0 + e, n + " gather vector run");
      } else {
        const MapChannel ce =
            cf && v > 1 ? map_channel_of<uint32_t>(m, ss, ChannelDigits<uint32_t>{
                                                    static_cast<uint32_t>(kk), 0u})
               : ch;
        check(map_offset(m, ss, ce, b * ss.b, gy, xx) == want, n + " gather scalar");
      }
      ++writes[dst];
    }
  });
  bool ok = true;
  for (int w : writes) ok = ok && w == 1;
  check(ok, n + " gather writes once v" + std::to_string(v));
}

// unfold_kernel for one vector width v.
void check_unfold(const TokenMap& m, int64_t B, bool cl, int64_t v, int64_t stride,
                  const std::string& n) {
  const int64_t K = m.K(), GH = m.GH(), GW = m.GW();
  const Strides4 gs = strides(K, GH, GW, cl), os = strides(m.C, m.H, m.W, cl);
  const bool cf = os.c < os.w;
  if (v > 1 && !unfold_vector_ok(m, gs, os, cf, v)) return;
  std::vector<int> writes(B * m.C * m.H * m.W, 0);
  walk(B, m.C, m.H, m.W, cf, v, stride, n, [&](int64_t b, int64_t c, int64_t h, int64_t w) {
    const int64_t i = m.axis == 2 ? h : w, other = m.axis == 2 ? w : h;
    const int64_t pos = fold_target(m, i);
    const bool second = m.wrap && pos + m.L < m.Lp;
    const GridPos g = fold_grid_pos_i<uint32_t>(m, static_cast<uint32_t>(c),
                                                static_cast<uint32_t>(pos), other);
    const int64_t o1 = b * gs.b + g.k * gs.c + g.gy * gs.h + g.gx * gs.w;
    int64_t o2 = -1;
    if (second) {
      const GridPos g2 = fold_grid_pos_i<uint32_t>(m, static_cast<uint32_t>(c),
                                                   static_cast<uint32_t>(pos + m.L), other);
      o2 = b * gs.b + g2.k * gs.c + g2.gy * gs.h + g2.gx * gs.w;
    }
    const int64_t oo = b * os.b + c * os.c + h * os.h + w * os.w;
    if (v > 1) ++g_unfold_vec;
    if (v > 1) check(o1 % v == 0 && (!second || o2 % v == 0) && oo % v == 0, n + " unfold aligned");
    for (int64_t e = 0; e < v; ++e) {
      const int64_t we = w + e;
      const int64_t ie = m.axis == 2 ? h : we, oe = m.axis == 2 ? we : h;
      const int64_t pe = fold_target(m, ie);
      const GridPos ge = fold_grid_pos(m, c, pe, oe);
      const int64_t want1 = b * gs.b + ge.k * gs.c + ge.gy * gs.h + ge.gx * gs.w;
      const bool se = m.wrap && pe + m.L < m.Lp;
      int64_t want2 = -1;
      if (se) {
        const GridPos g2 = fold_grid_pos(m, c, pe + m.L, oe);
        want2 = b * gs.b + g2.k * gs.c + g2.gy * gs.h + g2.gx * gs.w;
      }
      // The grid element found for output i is the one the fold map reads source i from.
      const int64_t hh = m.axis == 2 ? ie : oe, ww = m.axis == 2 ? oe : ie;
      const int64_t src_i = b * os.b + c * os.c + hh * os.h + ww * os.w;
      check(source_offset(m, os, b, ge.k, ge.gy, ge.gx) == src_i, n + " unfold inverse");
      check(se == second && want1 == o1 + e && (!se || want2 == o2 + e), n + " unfold item");
      ++writes[oo + e * (cf ? os.c : os.w)];
    }
  });
  bool ok = true;
  for (int w : writes) ok = ok && w == 1;
  check(ok, n + " unfold writes once v" + std::to_string(v));
}

void run_case(Case& c) {
  c.map.dyx = c.table.empty() ? nullptr : c.table.data();
  const TokenMap& m = c.map;
  const int64_t B = 2;
  for (bool cl : {false, true}) {
    const std::string n = c.name + (cl ? " cl" : " nchw");
    check_split(m, strides(m.C, m.H, m.W, cl), B, n);
    for (int64_t v : {1, 2, 4, 8})
      for (int64_t stride : {7, 64, 1000}) {
        check_gather(m, B, cl, v, stride, n);
        if (m.kind == MapKind::Fold) check_unfold(m, B, cl, v, stride, n);
      }
    // The projection reading through the map, stored plainly, and (folds) stored back through
    // the same fold without wrap (linear_region_unfold's store).
    TokenMap id{};
    id.kind = MapKind::Identity;
    const int64_t J = m.kind == MapKind::Fold ? m.K() : 20;
    id.C = J;
    id.H = m.GH();
    id.W = m.GW();
    check_linear(m, id, strides(J, m.GH(), m.GW(), cl), B, J, n + " out identity");
    if (m.kind == MapKind::Fold) {
      TokenMap back = m;
      back.wrap = false;
      check_linear(m, back, strides(m.C, m.H, m.W, cl), B, m.K(), n + " out fold");
    }
    for (int64_t chunks : {1, 3, 7}) {
      check_weight_grad<uint32_t>(B, m.GH(), m.GW(), chunks, n);
      check_weight_grad<int64_t>(B, m.GH(), m.GW(), chunks, n + " int64");
    }
  }
}

}  // namespace

int main() {
  std::vector<Case> cases;
  cases.push_back(identity_case(16, 5, 8));
  cases.push_back(identity_case(3, 7, 7));
  for (bool circ : {false, true}) {
    cases.push_back(shift_case(16, 8, 8, circ, 4, 1));
    cases.push_back(shift_case(16, 6, 16, circ, 8, 2));
    cases.push_back(shift_case(12, 7, 5, circ, 1, 3));
    cases.push_back(shift_case(8, 3, 4, circ, 2, 5));
  }
  for (bool wrap : {false, true}) {
    for (int axis : {2, 3}) {
      cases.push_back(fold_case(8, 7, 8, axis, 2, 3, wrap));   // map not a multiple of p
      cases.push_back(fold_case(4, 9, 16, axis, 4, 5, wrap));
      cases.push_back(fold_case(3, 6, 6, axis, 3, 0, wrap));
      cases.push_back(fold_case(16, 8, 5, axis, 3, 4, wrap));
      cases.push_back(fold_case(2, 5, 5, axis, 5, 2, wrap));   // p = L
      cases.push_back(fold_case(2, 20, 20, axis, 1, 7, wrap));  // p = 1
    }
  }
  for (Case& c : cases) run_case(c);
  check(g_run_w > 0 && g_run_c > 0 && g_run_scalar > 0 && g_unfold_vec > 0, "vector coverage");
  std::printf("vector items: %lld column runs, %lld channel runs, %lld scalar, %lld unfold\n",
              static_cast<long long>(g_run_w), static_cast<long long>(g_run_c),
              static_cast<long long>(g_run_scalar), static_cast<long long>(g_unfold_vec));
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(g_checks),
              static_cast<long long>(g_failures));
  return g_failures == 0 ? 0 : 1;
}
