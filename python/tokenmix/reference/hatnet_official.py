"""Eager re-implementation of the official HAT-Net network (official code: ``HAT_Net.py``), our
own code written from reading it, with its constructor signatures and state_dict key names:
``InvertedResidual``, ``Attention`` (H-MHSA), ``Block``, ``Downsample``, ``HAT_Net`` and the entry
point ``HAT_Net_tiny`` (also under our model's name, ``hatnet_tiny``).

Everything runs as the official code runs it: GroupNorm(1, C) as the only norm, the 1x1
convolutions of an NCHW map as projections, the local step of H-MHSA as a reshape of the map into
``grid_size x grid_size`` windows (so H and W at each stage with ``grid_size > 1`` must be
multiples of it: the reshape fails otherwise), in-place SiLU and dropout. ``Attention.proj_norm``
is built (it is in the checkpoints) and never used, as in the official code.

Nothing in the library imports this module; tests do (the oracle of ``tokenmix.models.hatnet``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.nn.shift import DropPath as _DropPath  # stochastic depth: the same as timm's

__all__ = ["InvertedResidual", "Attention", "Block", "Downsample", "HAT_Net", "HAT_Net_tiny", "hatnet_tiny"]


class InvertedResidual(nn.Module):
    """The convolutional half of a block: ``conv1`` (GroupNorm, 1x1 conv to ``hidden_dim``,
    activation), ``conv2`` (depthwise ``kernel_size`` conv, activation), ``conv3`` (1x1 conv to
    ``out_dim``, GroupNorm); channel dropout after conv2 and conv3. No conv has a bias."""

    def __init__(self, in_dim, hidden_dim=None, out_dim=None, kernel_size=3, drop=0., act_layer=nn.SiLU):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        out_dim = out_dim or in_dim
        self.conv1 = nn.Sequential(nn.GroupNorm(1, in_dim, eps=1e-6),
                                   nn.Conv2d(in_dim, hidden_dim, 1, bias=False),
                                   act_layer(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=(kernel_size - 1) // 2,
                                             groups=hidden_dim, bias=False),
                                   act_layer(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(hidden_dim, out_dim, 1, bias=False),
                                   nn.GroupNorm(1, out_dim, eps=1e-6))
        self.drop = nn.Dropout2d(drop, inplace=True)

    def forward(self, x):
        x = self.drop(self.conv2(self.conv1(x)))
        return self.drop(self.conv3(x))


class Attention(nn.Module):
    """H-MHSA on an NCHW map, ``heads = dim // head_dim``, scale ``head_dim ** -0.5``.

    ``grid_size > 1``: ``qkv`` (1x1 conv) of ``norm(x)``; attention inside each non-overlapping
    ``grid_size x grid_size`` window; ``grid_x = grid_norm(x + local)``; then every token of
    ``q(grid_x)`` attends to the tokens of ``kv(ds_norm(avg_pool(grid_x)))`` (``ds_ratio`` pooling);
    ``proj(global + grid_x)``. ``grid_size == 1``: plain multi-head attention over all tokens of
    ``qkv(norm(x))``, then ``proj``. Channel ``c`` of q, k, v is head ``c // head_dim``, feature
    ``c % head_dim``."""

    def __init__(self, dim, head_dim, grid_size=1, ds_ratio=1, drop=0.):
        super().__init__()
        assert dim % head_dim == 0
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.grid_size = grid_size
        self.norm = nn.GroupNorm(1, dim, eps=1e-6)
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_norm = nn.GroupNorm(1, dim, eps=1e-6)
        self.drop = nn.Dropout2d(drop, inplace=True)
        if grid_size > 1:
            self.grid_norm = nn.GroupNorm(1, dim, eps=1e-6)
            self.avg_pool = nn.AvgPool2d(ds_ratio, stride=ds_ratio)
            self.ds_norm = nn.GroupNorm(1, dim, eps=1e-6)
            self.q = nn.Conv2d(dim, dim, 1)
            self.kv = nn.Conv2d(dim, dim * 2, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h, d, g = self.num_heads, self.head_dim, self.grid_size
        qkv = self.qkv(self.norm(x))
        if g > 1:
            gh, gw = H // g, W // g
            # [B, 3, h, d, gh, g, gw, g] -> [3, B * h * gh * gw, g * g, d]: one row per window.
            qkv = qkv.reshape(B, 3, h, d, gh, g, gw, g).permute(1, 0, 2, 4, 6, 5, 7, 3)
            q, k, v = qkv.reshape(3, -1, g * g, d)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            local = (attn @ v).reshape(B, h, gh, gw, g, g, d).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, C, H, W)
            grid_x = self.grid_norm(x + local)
            q = self.q(grid_x).reshape(B, h, d, -1).transpose(-2, -1)
            kv = self.kv(self.ds_norm(self.avg_pool(grid_x)))
            k, v = kv.reshape(B, 2, h, d, -1).permute(1, 0, 2, 4, 3)
        else:
            q, k, v = qkv.reshape(B, 3, h, d, -1).permute(1, 0, 2, 4, 3)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        global_x = (attn @ v).transpose(-2, -1).reshape(B, C, H, W)
        if g > 1:
            global_x = global_x + grid_x
        return self.drop(self.proj(global_x))


class Block(nn.Module):
    """``x + drop_path(attn(x))``, then ``x + drop_path(conv(x))`` (an InvertedResidual with
    ``expansion`` x hidden channels)."""

    def __init__(self, dim, head_dim, grid_size=1, ds_ratio=1, expansion=4, drop=0., drop_path=0., kernel_size=3,
                 act_layer=nn.SiLU):
        super().__init__()
        self.drop_path = _DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.attn = Attention(dim, head_dim, grid_size=grid_size, ds_ratio=ds_ratio, drop=drop)
        self.conv = InvertedResidual(dim, hidden_dim=dim * expansion, out_dim=dim, kernel_size=kernel_size,
                                     drop=drop, act_layer=act_layer)

    def forward(self, x):
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.conv(x))


class Downsample(nn.Module):
    """3x3 stride-2 conv (padding 1), GroupNorm."""

    def __init__(self, in_dim, out_dim, kernel_size=3):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=1, stride=2)
        self.norm = nn.GroupNorm(1, out_dim, eps=1e-6)

    def forward(self, x):
        return self.norm(self.conv(x))


class HAT_Net(nn.Module):  # noqa: N801  (the official class name)
    """The official network: ``patch_embed`` (3x3 stride-2 conv to 16 channels, GroupNorm,
    activation, 3x3 stride-2 conv to ``dims[0]``), four stages of Blocks (``blocks[i]``) with
    ``ds2``, ``ds3``, ``ds4`` between them, global average pooling and ``classifier`` (dropout 0.2,
    Linear). Drop-path rates rise linearly over all blocks. ``img_size`` is unused, as there; the
    stem always takes 3 channels, as there."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, dims=(64, 128, 256, 512), head_dim=64,
                 expansions=(4, 4, 6, 6), grid_sizes=(1, 1, 1, 1), ds_ratios=(8, 4, 2, 1), depths=(3, 4, 8, 3),
                 drop_rate=0., drop_path_rate=0., act_layer=nn.SiLU, kernel_sizes=(3, 3, 3, 3)):
        super().__init__()
        self.depths = depths
        self.patch_embed = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, stride=2),
                                         nn.GroupNorm(1, 16, eps=1e-6),
                                         act_layer(inplace=True),
                                         nn.Conv2d(16, dims[0], 3, padding=1, stride=2))
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.blocks = nn.ModuleList([nn.ModuleList([
            Block(dims[s], head_dim, grid_size=grid_sizes[s], ds_ratio=ds_ratios[s], expansion=expansions[s],
                  drop=drop_rate, drop_path=dpr[sum(depths[:s]) + i], kernel_size=kernel_sizes[s],
                  act_layer=act_layer)
            for i in range(depths[s])]) for s in range(len(dims))])
        self.ds2 = Downsample(dims[0], dims[1])
        self.ds3 = Downsample(dims[1], dims[2])
        self.ds4 = Downsample(dims[2], dims[3])
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(dims[-1], num_classes))
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x):
        x = self.patch_embed(x)
        for i, stage in enumerate(self.blocks):
            if i > 0:
                x = (self.ds2, self.ds3, self.ds4)[i - 1](x)
            for block in stage:
                x = block(x)
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.classifier(x)


def HAT_Net_tiny(**kwargs) -> HAT_Net:  # noqa: N802  (the official entry point's name)
    """HAT-Net-Tiny: dims [48, 96, 240, 384], head_dim 48, expansions [8, 8, 4, 4], grid sizes
    [8, 7, 7, 1], downsampling ratios [8, 4, 2, 1], depths [2, 2, 6, 3]."""
    return HAT_Net(dims=[48, 96, 240, 384], head_dim=48, expansions=[8, 8, 4, 4], grid_sizes=[8, 7, 7, 1],
                   ds_ratios=[8, 4, 2, 1], depths=[2, 2, 6, 3], **kwargs)


hatnet_tiny = HAT_Net_tiny
