"""Eager re-implementation of the official HorNet network (official code: ``hornet.py``), our
own code written from reading it, with its constructor signatures and state_dict key names:
``LayerNorm`` (both data formats), ``GlobalLocalFilter``, ``gnconv``, ``Block``, ``HorNet`` and
the entry points ``hornet_tiny_7x7`` and ``hornet_tiny_gf``.

Everything runs as the official code runs it, dtype promotions included: the global filter takes
its FFT of the fp32 input and multiplies by the filter in the parameter's own dtype. The only
departure: the official ``gnconv`` prints a line per instance; this one does not.

Nothing in the library imports this module; tests do (the oracle of ``tokenmix.models.hornet``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.nn.shift import DropPath as _DropPath  # stochastic depth: the same as timm's

__all__ = ["LayerNorm", "GlobalLocalFilter", "gnconv", "Block", "HorNet", "hornet_tiny_7x7", "hornet_tiny_gf"]


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (``channels_last``) or over dim 1 of an NCHW map
    (``channels_first``, written out: mean, biased variance, eps inside the square root)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise NotImplementedError(data_format)
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps, self.data_format = eps, data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GlobalLocalFilter(nn.Module):
    """HorNet-GF's filter: pre-norm; a 3x3 depthwise conv on the first half of the channels; on
    the second half, ``irfft2(rfft2(x) * W)`` (``norm='ortho'``, the fp32 input, the filter ``W``
    bilinearly resized when the spectrum is not ``h x (w)``); halves interleaved; post-norm."""

    def __init__(self, dim, h=14, w=8):
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.empty(dim // 2, h, w, 2, dtype=torch.float32))
        nn.init.trunc_normal_(self.complex_weight, std=.02)
        self.pre_norm = LayerNorm(dim, eps=1e-6, data_format='channels_first')
        self.post_norm = LayerNorm(dim, eps=1e-6, data_format='channels_first')

    def forward(self, x):
        x = self.pre_norm(x)
        local, glob = torch.chunk(x, 2, dim=1)
        local = self.dw(local)
        glob = glob.to(torch.float32)
        B, C, a, b = glob.shape
        spec = torch.fft.rfft2(glob, dim=(2, 3), norm='ortho')
        weight = self.complex_weight
        if weight.shape[1:3] != spec.shape[2:4]:
            weight = F.interpolate(weight.permute(3, 0, 1, 2), size=spec.shape[2:4], mode='bilinear',
                                   align_corners=True).permute(1, 2, 3, 0)
        spec = spec * torch.view_as_complex(weight.contiguous())
        glob = torch.fft.irfft2(spec, s=(a, b), dim=(2, 3), norm='ortho')
        x = torch.cat([local.unsqueeze(2), glob.unsqueeze(2)], dim=2).reshape(B, 2 * C, a, b)
        return self.post_norm(x)


class gnconv(nn.Module):  # noqa: N801  (the official class name)
    """The official recursive gated convolution: ``proj_in`` (dim -> 2 dim), a 7x7 depthwise conv
    (or ``gflayer``) over the ``sum(dims)`` gate channels scaled by ``s``, the chain of ``pws``
    1x1 convs each multiplied by its gate, ``proj_out``."""

    def __init__(self, dim, order=5, gflayer=None, h=14, w=8, s=1.0):
        super().__init__()
        self.order = order
        self.dims = [dim // 2 ** i for i in range(order)][::-1]
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        if gflayer is None:
            c = sum(self.dims)
            self.dwconv = nn.Conv2d(c, c, kernel_size=7, padding=3, bias=True, groups=c)
        else:
            self.dwconv = gflayer(sum(self.dims), h=h, w=w)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])
        self.scale = s

    def forward(self, x):
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * gates[0]
        for i in range(self.order - 1):
            x = self.pws[i](x) * gates[i + 1]
        return self.proj_out(x)


class Block(nn.Module):
    """``x + drop_path(gamma1 * gnconv(norm1(x)))`` (channels-first LayerNorm), then the
    channels-last MLP ``x + drop_path(gamma2 * pwconv2(gelu(pwconv1(norm2(x)))))``."""

    def __init__(self, dim, drop_path=0., layer_scale_init_value=1e-6, gnconv=gnconv):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6, data_format='channels_first')
        self.gnconv = gnconv(dim)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = _DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        C = x.shape[1]
        g1 = self.gamma1.view(C, 1, 1) if self.gamma1 is not None else 1
        x = x + self.drop_path(g1 * self.gnconv(self.norm1(x)))
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class HorNet(nn.Module):
    """The official network: ``downsample_layers`` (stem: 4x4 stride-4 conv + channels-first
    LayerNorm; then LayerNorm + 2x2 stride-2 conv, three times), ``stages`` of Blocks with widths
    ``base_dim * [1, 2, 4, 8]``, a linearly increasing drop-path rate, global mean, ``norm``
    (LayerNorm) and ``head``. ``gnconv`` is one constructor or a list of four (per stage)."""

    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), base_dim=96, drop_path_rate=0.,
                 layer_scale_init_value=1e-6, head_init_scale=1., gnconv=gnconv, block=Block, uniform_init=False):
        super().__init__()
        dims = [base_dim, base_dim * 2, base_dim * 4, base_dim * 8]
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        dp_rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        mixers = list(gnconv) if isinstance(gnconv, list) else [gnconv] * 4
        assert len(mixers) == 4
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                block(dim=dims[i], drop_path=dp_rates[cur + j], layer_scale_init_value=layer_scale_init_value,
                      gnconv=mixers[i]) for j in range(depths[i])]))
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.uniform_init = uniform_init
        self.apply(self._init_weights)
        self.head.weight.data.mul_(head_init_scale)
        self.head.bias.data.mul_(head_init_scale)

    def _init_weights(self, m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if self.uniform_init:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x.mean([-2, -1]))

    def forward(self, x):
        return self.head(self.forward_features(x))


def _tiny(gf: bool, **kwargs) -> HorNet:
    s = 1.0 / 3.0
    late = [dict(h=14, w=8, gflayer=GlobalLocalFilter), dict(h=7, w=4, gflayer=GlobalLocalFilter)] if gf else [{}, {}]
    return HorNet(depths=[2, 3, 18, 2], base_dim=64, block=Block,
                  gnconv=[partial(gnconv, order=2, s=s), partial(gnconv, order=3, s=s),
                          partial(gnconv, order=4, s=s, **late[0]), partial(gnconv, order=5, s=s, **late[1])],
                  **kwargs)


def hornet_tiny_7x7(**kwargs) -> HorNet:
    """HorNet-T (7x7): depths [2, 3, 18, 2], base_dim 64, orders [2, 3, 4, 5], s = 1/3."""
    return _tiny(False, **kwargs)


def hornet_tiny_gf(**kwargs) -> HorNet:
    """HorNet-T (GF): as 7x7, with GlobalLocalFilter (h, w) = (14, 8) and (7, 4) in stages 3, 4."""
    return _tiny(True, **kwargs)
