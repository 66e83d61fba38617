"""LIT (Pan et al., "Less is More: Pay Less Attention in Vision Transformers", AAAI 2022) as in
the official code (``classification/code_for_lit_ti``: ``lit.py``, ``blocks.py``, ``attention.py``,
``patch_embed.py``): same architecture, configuration, initialisation and state_dict keys, its
deformable token merging running on :class:`tokenmix.nn.DeformablePatchMerging`.

A four-stage pyramid of token sequences ``[B, N, C]``:

- stage 1: ``patch_embed1`` (``patch_size`` conv, LayerNorm) to ``H/4 x W/4`` tokens, plus
  ``pos_embed1``, then ``block1``: :class:`MLPBlock` only (``x + mlp(norm2(x))``: the paper's
  finding that early self-attention attends locally and can be dropped);
- stage 2: ``patch_embed2`` (:class:`DeformableTokenMerging`: the tokens as a map, a 2x2 stride-2
  deformable convolution whose sampling offsets a zero-initialised 2x2 conv predicts, BatchNorm,
  GELU) to ``H/8 x W/8``, plus ``pos_embed2``, ``block2`` of MLP blocks;
- stage 3: merging to ``H/16 x W/16``, ``pos_embed3``, ``block3``: :class:`ViTBlock` (global
  multi-head self-attention and MLP, pre-norm);
- stage 4: merging to ``H/32 x W/32``, the class token prepended, ``pos_embed4``, ``block4`` of
  ViT blocks; ``norm``; the class token's features go to ``head``.

The positional embeddings are learned tensors with one slot per token of an ``img_size`` input,
added as they are: like the official network, a model takes exactly the input size it was built
for (``img_size``, a multiple of ``8 * patch_size`` = 32 per side; 224 by default, so LIT-Ti at
256 is ``create("lit_ti", img_size=256)``). Nothing is interpolated.

``fused=False`` builds the same model whose token mixers run the official computation in eager
PyTorch: the attention as the official explicit ``softmax(q k^T * scale) v``, and the merging
layers' deformable convolution (a compiled DCNv1 extension in the official code) as bilinear
sampling with torchvision's rule and a matrix product, :func:`deform_merge_eager`;
``fused=True`` runs ``tokenmix.ops.deform_conv2d`` and ``F.scaled_dot_product_attention``. The two share every
parameter and buffer, and a state_dict moves between them; the modules' ``fused`` attribute can
also be flipped on a built model.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from tokenmix.models import Backbone, Mlp, build, default_cfg, init_transformer_weights, register
from tokenmix.nn.deform_conv2d import DeformablePatchMerging
from tokenmix.nn.shift import DropPath

__all__ = ["deform_merge_eager", "DeformableTokenMerging", "Mlp", "MLPBlock", "Attention", "ViTBlock", "PatchEmbed",
           "LIT", "lit_ti"]

# Read by timm's register_model: the preprocessing LIT-Ti was trained and evaluated with (DeiT's).
default_cfgs = {"lit_ti": default_cfg("lit_ti.pth", "patch_embed1.proj")}


def deform_merge_eager(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor, k: int) -> Tensor:
    r"""The merging layers' deformable convolution (kernel = stride = ``k``, no padding, one offset
    group) in plain PyTorch, with torchvision's sampling rule:

    .. math::
        \mathrm{out}[b, o, i, j] = \mathrm{bias}[o] + \sum_{c, t} W[o, c, t]\;
            \mathrm{bilinear}\bigl(x[b, c],\; (k i + t_y + \Delta y_t,\; k j + t_x + \Delta x_t)\bigr)

    for the ``k * k`` taps ``t = (t_y, t_x)``, ``offset[b, 2t : 2t + 2, i, j] = (Δy_t, Δx_t)``.
    Each of the four bilinear corners outside the map reads zero, so points one pixel or more
    outside read zero. ``x`` ``[B, C, H, W]``, ``offset`` ``[B, 2 k k, Ho, Wo]``; returns
    ``[B, C_out, Ho, Wo]``."""
    B, C, H, W = x.shape
    Ho, Wo = offset.shape[-2:]
    kk = k * k
    # Sampling positions in fp32 at least: bf16 (autocast) would round a position like 50.3 to
    # the nearest quarter pixel.
    dtype = torch.promote_types(offset.dtype, torch.float32)
    tap = torch.arange(k, device=x.device, dtype=dtype)
    rows = torch.arange(Ho, device=x.device, dtype=dtype) * k
    cols = torch.arange(Wo, device=x.device, dtype=dtype) * k
    off = offset.to(dtype).view(B, kk, 2, Ho, Wo)
    py = rows.view(1, 1, Ho, 1) + tap.repeat_interleave(k).view(1, kk, 1, 1) + off[:, :, 0]
    px = cols.view(1, 1, 1, Wo) + tap.repeat(k).view(1, kk, 1, 1) + off[:, :, 1]
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    flat = x.reshape(B, 1, C, H * W).expand(B, kk, C, H * W)
    sampled = 0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
            # The flat index is formed in floating point and zeroed outside before the integer
            # cast, so positions far outside (or non-finite) never index memory.
            idx = torch.where(inside, yy * W + xx, 0).long().view(B, kk, 1, Ho * Wo).expand(B, kk, C, Ho * Wo)
            corner = torch.gather(flat, 3, idx).view(B, kk, C, Ho, Wo)
            sampled = sampled + corner * torch.where(inside, wy * wx, 0).unsqueeze(2)
    out = torch.einsum("ock,bkcp->bop", weight.flatten(2), sampled.flatten(3))
    return (out + bias.view(1, -1, 1)).view(B, -1, Ho, Wo)


class DeformableTokenMerging(DeformablePatchMerging):
    """LIT's ``DeformablePatchEmbed_GELU`` between stages: :class:`tokenmix.nn.DeformablePatchMerging`
    (the official keys ``dconv.{weight,bias}``, ``dconv.conv_offset.*``, ``norm_layer.*``; input
    ``[B, in_chans, H, W]``, tokens ``[B, (H/k)(W/k), out_chans]`` out) with a ``fused`` switch.

    Args:
        in_chans, out_chans: channels in and out.
        kernel_size: kernel and stride ``k`` (LIT: 2).
        fused: keyword-only; ``False`` runs the official eager computation (offsets, then
            :func:`deform_merge_eager`, BatchNorm, GELU) with the same parameters. An attribute,
            so it can be flipped on a built module.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 2, *, fused: bool = True):
        super().__init__(in_chans, out_chans, kernel_size)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return super().forward(x)
        d = self.dconv
        y = deform_merge_eager(x, d.conv_offset(x), d.weight, d.bias, self.kernel_size)
        return self.act_layer(self.norm_layer(y)).flatten(2).transpose(1, 2)


class MLPBlock(nn.Module):
    """The early stages' block, attention-free: ``x + drop_path(mlp(norm2(x)))`` (the official
    name of its only norm is ``norm2``; keys ``norm2``, ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, mlp_ratio: float = 4., drop: float = 0., drop_path: float = 0.,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    r"""LIT's ``ViTAttention``: global multi-head self-attention over all ``N`` tokens,
    ``proj(softmax(q k^T \cdot scale) v)`` per head with ``q, k, v`` from one ``qkv`` Linear
    (keys ``qkv``, ``proj``), dropout on the attention weights and after ``proj``.

    Args:
        dim, num_heads: width and heads (``dim % num_heads == 0``).
        qkv_bias: bias in ``qkv``; qk_scale: overrides ``head_dim ** -0.5``.
        attn_drop, proj_drop: dropout rates.
        fused: keyword-only; ``True`` runs ``F.scaled_dot_product_attention`` (no score matrix
            kept for backward where a fused kernel exists), ``False`` the official explicit
            computation. An attribute, so it can be flipped on a built module.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0., proj_drop: float = 0., *, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.fused = num_heads, fused
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            p = self.attn_drop.p if self.training else 0.
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        else:
            x = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class ViTBlock(nn.Module):
    """The late stages' block: ``x + drop_path(attn(norm1(x)))``, then
    ``x + drop_path(mlp(norm2(x)))`` (keys ``norm1``, ``attn.*``, ``norm2``, ``mlp.*``).
    ``fused`` (keyword-only) goes to the :class:`Attention`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, *, fused: bool = True):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, fused=fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """The stem: ``proj`` (conv, kernel = stride = ``patch_size``), then ``norm`` over the tokens
    (a LayerNorm with the default eps 1e-5, as the official stem, whatever the blocks' norm).
    ``[B, in_chans, H, W]`` -> ``[B, (H/p)(W/p), embed_dim]``; a channels_last input gives its
    tokens without a copy."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class LIT(Backbone):
    """The LIT network (the official ``LIT`` signature). The stage types are the official ones:
    MLP blocks in stages 1 and 2, ViT blocks in stages 3 and 4. Differences that change no result
    and no key: ``img_size`` may also be an ``(h, w)`` pair (the official code takes an int);
    an input of another size fails with an assertion naming both sizes (the official one fails
    adding the positional embedding); the default ``patch_size`` is LIT's 4, the only one the
    official stage sizes (``img_size // 4, // 8, // 16``) are consistent with; ``reset_classifier``
    works (the official one reads a missing attribute); and the timm model interface is added
    (``forward_features`` returns the normalised stage-4 tokens ``[B, 1 + HW/1024, C]``, class token
    first, which ``forward_head`` reduces to the class token's features; ``num_features``).

    Args beyond the official ones:
        fused: keyword-only; ``False`` runs every token mixer's official eager formulation.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: Sequence[int] = (64, 128, 256, 512),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, depths: Sequence[int] = (3, 4, 6, 3),
                 *, fused: bool = True):
        super().__init__()
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(depths) == 4):
            raise ValueError("LIT: embed_dims, num_heads, mlp_ratios and depths need one entry per stage (4)")
        self.img_size = _pair(img_size)
        if any(s % (8 * patch_size) for s in self.img_size):
            raise ValueError(f"LIT: img_size {self.img_size} must be a multiple of 8 * patch_size = {8 * patch_size}")
        self.patch_size = patch_size
        self.num_classes, self.num_features = num_classes, embed_dims[-1]
        h, w = self.img_size[0] // patch_size, self.img_size[1] // patch_size
        self.patch_embed1 = PatchEmbed(patch_size, in_chans, embed_dims[0])
        self.patch_embed2 = DeformableTokenMerging(embed_dims[0], embed_dims[1], 2, fused=fused)
        self.patch_embed3 = DeformableTokenMerging(embed_dims[1], embed_dims[2], 2, fused=fused)
        self.patch_embed4 = DeformableTokenMerging(embed_dims[2], embed_dims[3], 2, fused=fused)
        # Stage i has (h / 2^i) x (w / 2^i) tokens; stage 4 one more, the class token.
        self.pos_embed1 = nn.Parameter(torch.zeros(1, h * w, embed_dims[0]))
        self.pos_drop1 = nn.Dropout(p=drop_rate)
        self.pos_embed2 = nn.Parameter(torch.zeros(1, (h // 2) * (w // 2), embed_dims[1]))
        self.pos_drop2 = nn.Dropout(p=drop_rate)
        self.pos_embed3 = nn.Parameter(torch.zeros(1, (h // 4) * (w // 4), embed_dims[2]))
        self.pos_drop3 = nn.Dropout(p=drop_rate)
        self.pos_embed4 = nn.Parameter(torch.zeros(1, (h // 8) * (w // 8) + 1, embed_dims[3]))
        self.pos_drop4 = nn.Dropout(p=drop_rate)

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        first = [sum(depths[:i]) for i in range(4)]
        self.block1, self.block2 = (nn.ModuleList(
            MLPBlock(embed_dims[i], mlp_ratio=mlp_ratios[i], drop=drop_rate, drop_path=rates[first[i] + j],
                     norm_layer=norm_layer) for j in range(depths[i])) for i in (0, 1))
        self.block3, self.block4 = (nn.ModuleList(
            ViTBlock(embed_dims[i], num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, qk_scale=qk_scale,
                     drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[first[i] + j], norm_layer=norm_layer,
                     fused=fused) for j in range(depths[i])) for i in (2, 3))
        self.norm = norm_layer(embed_dims[3])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()

        for p in (self.pos_embed1, self.pos_embed2, self.pos_embed3, self.pos_embed4, self.cls_token):
            nn.init.trunc_normal_(p, std=.02)
        # The official initialisation; the convolutions keep PyTorch's, the offset convolutions
        # start at zero and the BatchNorms at identity.
        self.apply(init_transformer_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names timm's optimiser factory exempts from weight decay (the official set)."""
        return {"cls_token"}

    @staticmethod
    def _to_map(x: Tensor, h: int, w: int) -> Tensor:
        """Tokens ``[B, h w, C]`` -> the map ``[B, C, h, w]`` the next merging layer reads."""
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` (``(H, W) == img_size``) -> the normalised stage-4 tokens
        ``[B, 1 + (H/32)(W/32), embed_dims[3]]``, the class token first."""
        torch._assert(x.shape[-2:] == self.img_size,
                      f"LIT: input size ({x.shape[-2]}, {x.shape[-1]}) differs from img_size {self.img_size}; "
                      f"the positional embeddings fix it (build the model with img_size=...)")
        h, w = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
        x = self.run_blocks(self.block1, self.pos_drop1(self.patch_embed1(x) + self.pos_embed1))
        x = self.patch_embed2(self._to_map(x, h, w))
        x = self.run_blocks(self.block2, self.pos_drop2(x + self.pos_embed2))
        x = self.patch_embed3(self._to_map(x, h // 2, w // 2))
        x = self.run_blocks(self.block3, self.pos_drop3(x + self.pos_embed3))
        x = self.patch_embed4(self._to_map(x, h // 4, w // 4))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.run_blocks(self.block4, self.pos_drop4(x + self.pos_embed4))
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The class token's features, then ``head`` unless ``pre_logits``."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)


def _layer_norm_1e6(dim: int) -> nn.LayerNorm:
    """LIT-Ti's norm layer: LayerNorm with eps 1e-6 (a named function, so a config pickles)."""
    return nn.LayerNorm(dim, eps=1e-6)


def _build(name: str, pretrained: bool, config: dict, kwargs: dict) -> LIT:
    return build(name, LIT, pretrained, config, kwargs, default_cfgs[name])


@register
def lit_ti(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-Ti: patch 4, widths [64, 128, 320, 512], depths [3, 4, 6, 3] (MLP blocks in stages 1
    and 2), heads [1, 2, 5, 8], MLP ratios [8, 8, 4, 4], qkv bias, LayerNorm eps 1e-6;
    19.9 M parameters (the official README gives 19 M)."""
    config = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                  qkv_bias=True, norm_layer=_layer_norm_1e6, depths=[3, 4, 6, 3])
    return _build("lit_ti", pretrained, config, kwargs)
