"""Eager oracle of deformable convolution (DCNv1/v2, torchvision.ops.deform_conv2d semantics),
with the bilinear sampling written out: every tap of every output pixel samples its input channel
at a fractional position, zero outside the map, then a grouped matrix product mixes channels."""
from __future__ import annotations

import torch
from torch import Tensor


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def bilinear(planes: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """planes [N, C, H, W], y/x [N, *S] -> [N, C, *S]; torchvision's rule: corners outside the map
    count as zero, so a point at or beyond one pixel outside samples zero. There is no separate
    inside test: at exactly one pixel outside (y = -1) the value is zero either way, but the
    derivative is torchvision's, the one from the corner inside the map."""
    N, C, H, W = planes.shape
    flat = planes.reshape(N, C, H * W)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    out = 0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).reshape(N, 1, -1).expand(N, C, -1)
            v = torch.gather(flat, 2, idx).reshape(N, C, *y.shape[1:])
            out = out + v * (wy * wx * ok).unsqueeze(1)
    return out


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride=1, padding=0, dilation=1, mask: Tensor | None = None) -> Tensor:
    B, Cin, H, W = input.shape
    Cout, Cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    groups = Cin // Cin_g
    kk = kh * kw
    G = offset.shape[1] // (2 * kk)
    Ho, Wo = offset.shape[2], offset.shape[3]
    dev = input.device
    base_y = (torch.arange(Ho, device=dev) * sh - ph).view(1, Ho, 1) + \
        (torch.arange(kh, device=dev) * dh).repeat_interleave(kw).view(kk, 1, 1)
    base_x = (torch.arange(Wo, device=dev) * sw - pw).view(1, 1, Wo) + \
        (torch.arange(kw, device=dev) * dw).repeat(kh).view(kk, 1, 1)
    off = offset.view(B, G, kk, 2, Ho, Wo)
    y = base_y.to(offset.dtype) + off[:, :, :, 0]                     # [B, G, kk, Ho, Wo]
    x = base_x.to(offset.dtype) + off[:, :, :, 1]
    planes = input.reshape(B * G, Cin // G, H, W)
    cols = bilinear(planes, y.reshape(B * G, kk, Ho, Wo), x.reshape(B * G, kk, Ho, Wo))
    cols = cols.reshape(B, G, Cin // G, kk, Ho, Wo)
    if mask is not None:
        cols = cols * mask.view(B, G, 1, kk, Ho, Wo)
    cols = cols.reshape(B, groups, Cin_g * kk, Ho * Wo)
    w = weight.reshape(groups, Cout // groups, Cin_g * kk)
    out = torch.einsum("gok,bgkp->bgop", w, cols).reshape(B, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, Cout, 1, 1)
    return out
