"""HorNet's recursive gated convolution as modules, state_dict-compatible with HorNet:
``GnConv`` (the fused ``tokenmix.ops.gnconv`` underneath) and HorNet-GF's ``GlobalLocalFilter``,
which can stand in for GnConv's depthwise conv."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmix.ops.gnconv import gate_dims, gnconv

__all__ = ["GnConv", "GlobalLocalFilter", "LayerNorm2d"]


class GnConv(nn.Module):
    r"""HorNet's ``gnconv``: recursive gated convolution of order ``order`` (see
    ``tokenmix.ops.gnconv`` for the math). Input and output ``[B, dim, H, W]``; channels_last
    input gives channels_last output.

    Keys as HorNet: ``proj_in`` (1x1, dim -> 2 dim), ``dwconv`` (depthwise k x k over
    ``sum(dims)`` channels), ``pws.{i}`` (1x1, dims[i] -> dims[i+1]), ``proj_out`` (1x1).

    Args:
        dim: channels; a multiple of ``2**(order-1)``.
        order: gating steps (HorNet uses 2, 3, 4, 5 in its four stages).
        s: the scale applied to the depthwise conv's output (HorNet's models use 1/3).
        kernel_size: the depthwise kernel (odd).
        gflayer: HorNet's hook for another spatial mixer: ``gflayer(sum(dims), h=h, w=w)`` builds
            ``dwconv`` (e.g. ``GlobalLocalFilter``); the gating chain then runs in eager PyTorch.
        h, w: passed to ``gflayer`` (its filter size).
        fused: keyword-only; ``False`` runs HorNet's official eager gnconv (1x1 conv, depthwise
            conv, split, gating products) with the same parameters, for comparisons. An attribute,
            so it can be flipped on a built module; without effect when ``gflayer`` is given
            (that path is always eager).
    """

    def __init__(self, dim: int, order: int = 5, s: float = 1.0 / 3, kernel_size: int = 7, *,
                 gflayer=None, h: int = 14, w: int = 8, fused: bool = True):
        super().__init__()
        if dim % 2 ** (order - 1):
            raise ValueError(f"GnConv: dim ({dim}) must be a multiple of 2**(order-1) = {2 ** (order - 1)}")
        if kernel_size % 2 == 0:
            raise ValueError(f"GnConv: kernel_size must be odd, got {kernel_size}")
        self.order, self.scale, self.fused = order, s, fused
        self.dims = gate_dims(dim, order)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        if gflayer is None:
            self.dwconv = nn.Conv2d(sum(self.dims), sum(self.dims), kernel_size,
                                    padding=(kernel_size - 1) // 2, groups=sum(self.dims))
        else:
            self.dwconv = gflayer(sum(self.dims), h=h, w=w)
        # Registered in HorNet's order (proj_out before pws): an official optimizer state, indexed
        # by parameter order, maps onto ours.
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and isinstance(self.dwconv, nn.Conv2d):
            return gnconv(x, self.proj_in.weight, self.proj_in.bias, self.dwconv.weight,
                          self.dwconv.bias, [p.weight for p in self.pws], [p.bias for p in self.pws],
                          self.proj_out.weight, self.proj_out.bias, order=self.order, scale=self.scale)
        # Another spatial mixer (gflayer) has no fused kernel, and fused=False asks for the
        # official computation: the gating chain runs in eager PyTorch, as HorNet writes it.
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        y = pwa * gates[0]
        for i, pw in enumerate(self.pws):
            y = pw(y) * gates[i + 1]
        return self.proj_out(y)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (HorNet's ``data_format='channels_first'``
    LayerNorm): keys ``weight``, ``bias``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GlobalLocalFilter(nn.Module):
    r"""HorNet-GF's global-local filter, a drop-in for GnConv's depthwise conv.

    Pre-norm; the first half of the channels through a 3x3 depthwise conv (local), the second
    half through a learned filter in the 2-D Fourier domain (global, computed in fp32:
    ``irfft2(rfft2(x) * W)``, ``norm='ortho'``, the filter resized bilinearly when the map's
    spectrum is not ``h x w``); the halves interleaved channel by channel (local, global, ...);
    post-norm. Keys as HorNet: ``dw.weight``, ``complex_weight`` (``[dim/2, h, w, 2]``),
    ``pre_norm.{weight,bias}``, ``post_norm.{weight,bias}``. The output has x's dtype.
    """

    def __init__(self, dim: int, h: int = 14, w: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.empty(dim // 2, h, w, 2, dtype=torch.float32))
        nn.init.trunc_normal_(self.complex_weight, std=0.02)
        self.pre_norm = LayerNorm2d(dim)
        self.post_norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre_norm(x)
        local, glob = torch.chunk(x, 2, dim=1)
        local = self.dw(local)
        B, C, a, b = glob.shape
        spec = torch.fft.rfft2(glob.float(), dim=(2, 3), norm="ortho")
        weight = self.complex_weight
        if weight.shape[1:3] != spec.shape[2:4]:
            weight = F.interpolate(weight.permute(3, 0, 1, 2), size=spec.shape[2:4], mode="bilinear",
                                   align_corners=True).permute(1, 2, 3, 0)
        spec = spec * torch.view_as_complex(weight.float().contiguous())
        glob = torch.fft.irfft2(spec, s=(a, b), dim=(2, 3), norm="ortho").to(local.dtype)
        x = torch.stack([local, glob], dim=2).reshape(B, 2 * C, a, b)
        return self.post_norm(x)
