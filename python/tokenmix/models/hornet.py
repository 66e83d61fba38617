"""HorNet (Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
Convolutions", NeurIPS 2022) as in the official code (``hornet.py``): same architecture,
configuration, initialisation and state_dict keys, its token mixers being
:class:`tokenmix.nn.GnConv` (HorNet-GF's with :class:`tokenmix.nn.GlobalLocalFilter` as spatial
mixer in stages 3 and 4).

The network is NCHW throughout: ``downsample_layers[0]`` is the stem (4x4 stride-4 conv,
channels-first LayerNorm), ``downsample_layers[1..3]`` (LayerNorm, 2x2 stride-2 conv) precede
stages 2 to 4; each stage is a Sequential of :class:`HorBlock` (``x + gamma1 * gnconv(norm1(x))``,
then a channels-last MLP ``x + gamma2 * pwconv2(gelu(pwconv1(norm2(x))))``); then a global mean,
``norm`` (LayerNorm) and ``head``. Stage ``i`` has width ``base_dim * 2**i`` and gnconv order
``orders[i]``.

``fused=False`` builds the same model whose 7x7 gnconvs run HorNet's eager computation (the
gnconvs with a GlobalLocalFilter always do); the two share every parameter, and a state_dict moves
between them. ``GnConv.fused`` can also be flipped on a built model.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from tokenmix.models import Backbone, build, default_cfg, register
from tokenmix.nn.gnconv import GlobalLocalFilter, GnConv, LayerNorm2d
from tokenmix.nn.shift import DropPath

__all__ = ["HorBlock", "HorNet", "hornet_tiny_7x7", "hornet_tiny_gf"]

# Read by timm's register_model; ConvNeXt-style, as HorNet is trained.
default_cfgs = {name: default_cfg(f"{name}.pth", "downsample_layers.0.0", pool_size=(7, 7))
                for name in ("hornet_tiny_7x7", "hornet_tiny_gf")}


class HorBlock(nn.Module):
    """HorNet's ``Block`` (the official keys): ``norm1`` (channels-first LayerNorm), ``gnconv``,
    ``gamma1``; ``norm2`` (LayerNorm over the channels of the NHWC view), ``pwconv1`` /
    ``pwconv2`` (``nn.Linear``, 4x expansion, GELU), ``gamma2``; stochastic depth on both
    branches. ``layer_scale_init_value <= 0`` drops the gammas (as the official code).

    Args:
        dim: channels.
        drop_path: stochastic depth rate.
        layer_scale_init_value: initial value of ``gamma1`` and ``gamma2``.
        order, s: the gnconv's order and scale.
        global_filter: ``(h, w)`` of a :class:`~tokenmix.nn.GlobalLocalFilter` replacing the
            gnconv's 7x7 depthwise conv (HorNet-GF), or ``None``.
        fused: keyword-only; ``False`` runs the official eager gnconv.
    """

    def __init__(self, dim: int, drop_path: float = 0., layer_scale_init_value: float = 1e-6, order: int = 5,
                 s: float = 1.0 / 3, global_filter: Optional[Tuple[int, int]] = None, *, fused: bool = True):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        if global_filter is None:
            self.gnconv = GnConv(dim, order=order, s=s, kernel_size=7, fused=fused)
        else:
            h, w = global_filter
            self.gnconv = GnConv(dim, order=order, s=s, gflayer=GlobalLocalFilter, h=h, w=w, fused=fused)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = self.gamma1[:, None, None] * y
        x = x + self.drop_path(y)
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class HorNet(Backbone):
    """The HorNet network. The official constructor takes per-stage ``gnconv`` constructors
    (``functools.partial`` of its ``gnconv``); this one takes their configuration instead:
    ``orders``, the scale ``s`` and ``global_filters`` (per stage, ``(h, w)`` of a
    GlobalLocalFilter or ``None`` for the 7x7 depthwise conv). Differences that change no result
    and no key: ``num_classes=0`` gives an ``nn.Identity`` head, and the timm model interface is
    added (``forward_features`` returns the last-stage map ``[B, 8 base_dim, H/32, W/32]``, before
    the official pooling and norm, which ``forward_head`` applies; ``get_classifier``,
    ``reset_classifier``, ``num_features``).

    Args beyond the official ones:
        fused: keyword-only; ``False`` runs every gnconv's official eager formulation.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 base_dim: int = 96, drop_path_rate: float = 0., layer_scale_init_value: float = 1e-6,
                 head_init_scale: float = 1., orders: Sequence[int] = (5, 5, 5, 5), s: float = 1.0,
                 global_filters: Sequence[Optional[Tuple[int, int]]] = (None, None, None, None),
                 uniform_init: bool = False, *, fused: bool = True):
        super().__init__()
        if not (len(depths) == len(orders) == len(global_filters) == 4):
            raise ValueError("HorNet: depths, orders and global_filters need one entry per stage (4)")
        dims = [base_dim * 2 ** i for i in range(4)]
        self.num_classes, self.num_features = num_classes, dims[-1]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                HorBlock(dims[i], drop_path=rates[first + j], layer_scale_init_value=layer_scale_init_value,
                         order=orders[i], s=s, global_filter=global_filters[i], fused=fused)
                for j in range(depths[i])]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.uniform_init = uniform_init
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def _init_weights(self, m: nn.Module) -> None:
        """The official ``_init_weights``: Conv2d and Linear weights truncated normal (std 0.02),
        or Xavier uniform with ``uniform_init``; their biases zero. (LayerNorms start at
        identity, the layer scales at ``layer_scale_init_value``, the global filters at their
        own truncated normal.)"""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if self.uniform_init:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the last stage's map ``[B, 8 base_dim, H/32, W/32]``."""
        for down, stage in zip(self.downsample_layers, self.stages):
            x = self.run_blocks(stage, down(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global mean, ``norm``, then ``head`` unless ``pre_logits``."""
        x = self.norm(x.mean([-2, -1]))
        return x if pre_logits else self.head(x)


def _build(name: str, pretrained: bool, config: dict, kwargs: dict) -> HorNet:
    return build(name, HorNet, pretrained, config, kwargs, default_cfgs[name])


_TINY = dict(depths=[2, 3, 18, 2], base_dim=64, orders=[2, 3, 4, 5], s=1.0 / 3.0)


@register
def hornet_tiny_7x7(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-T (7x7): depths [2, 3, 18, 2], widths [64, 128, 256, 512], gnconv orders
    [2, 3, 4, 5] with s = 1/3 and 7x7 depthwise convs; 22.4 M parameters."""
    return _build("hornet_tiny_7x7", pretrained, dict(_TINY, global_filters=[None, None, None, None]), kwargs)


@register
def hornet_tiny_gf(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-T (GF): as HorNet-T (7x7), with a GlobalLocalFilter of size (14, 8) in stage 3 and
    (7, 4) in stage 4 (the spectra of 224 x 224 inputs; other sizes resize the filter); 23.0 M
    parameters."""
    return _build("hornet_tiny_gf", pretrained, dict(_TINY, global_filters=[None, None, (14, 8), (7, 4)]), kwargs)
