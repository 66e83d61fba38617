// Channel layout and depthwise-convolution geometry of HorNet's gnConv, shared by the CPU and CUDA
// kernels. No torch headers.
#pragma once

#include <cstdint>

#include "tokenmix/macros.h"

namespace tokenmix {
namespace gnconv {

constexpr int kMaxOrder = 8;
constexpr int64_t kMaxKernel = 31;  // largest depthwise kernel size

// dims[i] = dim / 2^(order-1-i): the widths of the recursive gating steps, narrowest first.
// proj_in emits 2 * dim channels: p0 (dims[0]) then the S = sum(dims) channels the depthwise conv
// turns into the gates g_0..g_{order-1}; gate i occupies channels [offs[i], offs[i] + dims[i]) of
// the S.
struct Layout {
  int64_t dim, order, S;
  int64_t dims[kMaxOrder];
  int64_t offs[kMaxOrder];

  TM_HOST_DEVICE static Layout make(int64_t dim, int64_t order) {
    Layout l{};
    l.dim = dim;
    l.order = order;
    int64_t off = 0;
    for (int64_t i = 0; i < order; ++i) {
      l.dims[i] = dim >> (order - 1 - i);
      l.offs[i] = off;
      off += l.dims[i];
    }
    l.S = off;
    return l;
  }
  // Width of the proj_in output: p0 plus the gate channels, 2 * dim.
  TM_HOST_DEVICE int64_t proj_width() const { return dims[0] + S; }
};

// "same" depthwise k x k convolution (padding k / 2) over an H x W map; tap t = ky * k + kx reads
// input pixel (y + ky - pad, x + kx - pad) for output pixel (y, x).
struct DwGeometry {
  int64_t H, W, k;

  TM_HOST_DEVICE int64_t pad() const { return k / 2; }
  TM_HOST_DEVICE int64_t taps() const { return k * k; }
  // First and one-past-last kernel row (or column) whose input row (column) lies inside [0, n).
  TM_HOST_DEVICE int64_t tap_lo(int64_t pos) const {
    const int64_t lo = pad() - pos;
    return lo > 0 ? lo : 0;
  }
  TM_HOST_DEVICE int64_t tap_hi(int64_t pos, int64_t n) const {
    const int64_t hi = n - pos + pad();
    return hi < k ? hi : k;
  }
};

}  // namespace gnconv
}  // namespace tokenmix
