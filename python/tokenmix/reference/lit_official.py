"""Eager re-implementation of the official LIT-Ti network (official code: ``classification/
code_for_lit_ti``: ``lit.py``, ``blocks.py``, ``attention.py``, ``patch_embed.py`` and the DCN
module), our own code written from reading it, with its constructor signatures and state_dict key
names: ``Mlp``, ``ViTAttention``, ``ViTBlock``, ``MLPBlock``, ``PatchEmbed``,
``DeformConv2dPack``, ``DeformablePatchEmbed_GELU``, ``LIT`` and the entry point ``lit_ti``.

Everything runs as the official code runs it. The one substitution: the official deformable
convolution is a compiled extension (mmcv-style DCNv1, one offset group); here it is
``tokenmix.reference.deform_conv2d``, the eager oracle of the same sampling rule (bilinear, zeros
outside the map), checked against torchvision's kernel in ``tests/test_deform_conv2d.py``. The
offset visualisation helpers (``get_all_offsets``, ``return_offset``), ``reset_drop_path`` and
``reset_classifier`` are left out: they change no key and no result.

Nothing in the library imports this module; tests do (the oracle of ``tokenmix.models.lit``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from tokenmix.models import init_transformer_weights
from tokenmix.nn.shift import DropPath as _DropPath  # stochastic depth: the same as timm's
from tokenmix.reference.deform_conv2d import deform_conv2d

__all__ = ["Mlp", "ViTAttention", "ViTBlock", "MLPBlock", "PatchEmbed", "DeformConv2dPack",
           "DeformablePatchEmbed_GELU", "LIT", "lit_ti"]


class Mlp(nn.Module):
    """``drop(fc2(drop(act(fc1(x)))))``."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ViTAttention(nn.Module):
    """Global multi-head self-attention over all tokens: one ``qkv`` Linear, scores
    ``q k^T * scale``, softmax, ``attn_drop``, weighted sum of values, ``proj``, ``proj_drop``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ViTBlock(nn.Module):
    """``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ViTAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                 attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = _DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MLPBlock(nn.Module):
    """The early stages' attention-free block: ``x + drop_path(mlp(norm2(x)))`` only (the
    official name of its one norm is ``norm2``). ``num_heads``, ``qkv_bias``, ``qk_scale``,
    ``attn_drop``, ``sr_ratio`` and ``seq_len`` are accepted and unused, as in the official code."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm, sr_ratio=1, seq_len=0):
        super().__init__()
        self.sr_ratio = sr_ratio
        self.drop_path = _DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``proj`` (conv, kernel = stride = patch) and ``norm``
    (LayerNorm with the default eps 1e-5, whatever the network's norm layer); returns the tokens
    and the map size."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size, patch_size = _pair(img_size), _pair(patch_size)
        self.img_size, self.patch_size = img_size, patch_size
        assert img_size[0] % patch_size[0] == 0 and img_size[1] % patch_size[1] == 0, \
            f"img_size {img_size} should be divided by patch_size {patch_size}."
        self.H, self.W = img_size[0] // patch_size[0], img_size[1] // patch_size[1]
        self.num_patches = self.H * self.W
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        _, _, H, W = x.shape
        x = self.norm(self.proj(x).flatten(2).transpose(1, 2))
        return x, (H // self.patch_size[0], W // self.patch_size[1])


class DeformConv2dPack(nn.Module):
    """The official DCNv1 layer with its own offset branch: ``conv_offset`` (a Conv2d with the
    layer's kernel, stride and padding, zero-initialised) predicts per-tap (y, x) offsets; the
    deformable convolution's ``weight`` starts Kaiming-uniform (a = sqrt 5), ``bias`` uniform in
    +-1/sqrt(fan_in). One weight group and one offset group (the only ones LIT builds)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1, bias=True):
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.bias, -bound, bound)
        if not bias:
            self.bias.requires_grad = False
            self.bias.data.zero_()
        self.conv_offset = nn.Conv2d(in_channels, 2 * self.kernel_size[0] * self.kernel_size[1],
                                     kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                     bias=True)
        self.conv_offset.weight.data.zero_()
        self.conv_offset.bias.data.zero_()

    def forward(self, input):
        offset = self.conv_offset(input)
        out = deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                            dilation=self.dilation)
        return out, None


class DeformablePatchEmbed_GELU(nn.Module):  # noqa: N801  (the official class name)
    """Deformable token merging: ``dconv`` (DCNv1, kernel = stride = patch), BatchNorm2d
    (``norm_layer``, at identity), GELU; returns the tokens and the map size."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size, patch_size = _pair(img_size), _pair(patch_size)
        self.c_in, self.c_out = in_chans, embed_dim
        self.img_size, self.patch_size = img_size, patch_size
        assert img_size[0] % patch_size[0] == 0 and img_size[1] % patch_size[1] == 0, \
            f"img_size {img_size} should be divided by patch_size {patch_size}."
        self.H, self.W = img_size[0] // patch_size[0], img_size[1] // patch_size[1]
        self.num_patches = self.H * self.W
        self.dconv = DeformConv2dPack(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, padding=0)
        self.norm_layer = nn.BatchNorm2d(embed_dim)
        self.act_layer = nn.GELU()
        nn.init.constant_(self.norm_layer.weight, 1)
        nn.init.constant_(self.norm_layer.bias, 0)

    def forward(self, x):
        _, _, H, W = x.shape
        x, _ = self.dconv(x)
        x = self.act_layer(self.norm_layer(x)).flatten(2).transpose(1, 2)
        return x, (H // self.patch_size[0], W // self.patch_size[1])


class LIT(nn.Module):
    """The official network: ``patch_embed1`` (patch_size conv + LayerNorm), MLP blocks
    (``block1``, ``block2``), then deformable token merging (``patch_embed2..4``) before the
    attention stages (``block3``, ``block4``); learned absolute positional embeddings
    ``pos_embed1..4`` sized for ``img_size`` (stage 4's with one extra slot for ``cls_token``,
    prepended there); final ``norm``, the class token's features to ``head``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=[64, 128, 256, 512],
                 num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4], qkv_bias=False, qk_scale=None, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., norm_layer=nn.LayerNorm, depths=[3, 4, 6, 3]):
        super().__init__()
        self.num_classes = num_classes
        self.depths = depths
        self.patch_embed1 = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dims[0])
        self.patch_embed2 = DeformablePatchEmbed_GELU(img_size=img_size // 4, patch_size=2, in_chans=embed_dims[0],
                                                      embed_dim=embed_dims[1])
        self.patch_embed3 = DeformablePatchEmbed_GELU(img_size=img_size // 8, patch_size=2, in_chans=embed_dims[1],
                                                      embed_dim=embed_dims[2])
        self.patch_embed4 = DeformablePatchEmbed_GELU(img_size=img_size // 16, patch_size=2, in_chans=embed_dims[2],
                                                      embed_dim=embed_dims[3])
        self.pos_embed1 = nn.Parameter(torch.zeros(1, self.patch_embed1.num_patches, embed_dims[0]))
        self.pos_drop1 = nn.Dropout(p=drop_rate)
        self.pos_embed2 = nn.Parameter(torch.zeros(1, self.patch_embed2.num_patches, embed_dims[1]))
        self.pos_drop2 = nn.Dropout(p=drop_rate)
        self.pos_embed3 = nn.Parameter(torch.zeros(1, self.patch_embed3.num_patches, embed_dims[2]))
        self.pos_drop3 = nn.Dropout(p=drop_rate)
        self.pos_embed4 = nn.Parameter(torch.zeros(1, self.patch_embed4.num_patches + 1, embed_dims[3]))
        self.pos_drop4 = nn.Dropout(p=drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        common = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                      norm_layer=norm_layer)
        cur = 0
        self.block1 = nn.ModuleList([MLPBlock(dim=embed_dims[0], num_heads=num_heads[0], mlp_ratio=mlp_ratios[0],
                                              drop_path=dpr[cur + i], **common) for i in range(depths[0])])
        cur += depths[0]
        self.block2 = nn.ModuleList([MLPBlock(dim=embed_dims[1], num_heads=num_heads[1], mlp_ratio=mlp_ratios[1],
                                              drop_path=dpr[cur + i], **common) for i in range(depths[1])])
        cur += depths[1]
        self.block3 = nn.ModuleList([ViTBlock(dim=embed_dims[2], num_heads=num_heads[2], mlp_ratio=mlp_ratios[2],
                                              drop_path=dpr[cur + i], **common) for i in range(depths[2])])
        cur += depths[2]
        self.block4 = nn.ModuleList([ViTBlock(dim=embed_dims[3], num_heads=num_heads[3], mlp_ratio=mlp_ratios[3],
                                              drop_path=dpr[cur + i], **common) for i in range(depths[3])])
        self.norm = norm_layer(embed_dims[3])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()

        for p in (self.pos_embed1, self.pos_embed2, self.pos_embed3, self.pos_embed4, self.cls_token):
            nn.init.trunc_normal_(p, std=.02)
        self.apply(init_transformer_weights)  # the official _init_weights

    def no_weight_decay(self):
        return {'cls_token'}

    def forward_features(self, x):
        B = x.shape[0]
        x, (H, W) = self.patch_embed1(x)
        x = self.pos_drop1(x + self.pos_embed1)
        for blk in self.block1:
            x = blk(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()

        x, (H, W) = self.patch_embed2(x)
        x = self.pos_drop2(x + self.pos_embed2)
        for blk in self.block2:
            x = blk(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()

        x, (H, W) = self.patch_embed3(x)
        x = self.pos_drop3(x + self.pos_embed3)
        for blk in self.block3:
            x = blk(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()

        x, (H, W) = self.patch_embed4(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop4(x + self.pos_embed4)
        for blk in self.block4:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


def lit_ti(**kwargs) -> LIT:
    """LIT-Ti: patch 4, widths [64, 128, 320, 512], heads [1, 2, 5, 8], MLP ratios [8, 8, 4, 4],
    depths [3, 4, 6, 3], qkv bias, LayerNorm eps 1e-6."""
    return LIT(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
               qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=[3, 4, 6, 3], **kwargs)
