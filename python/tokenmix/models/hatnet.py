"""HAT-Net (Liu et al., "Vision Transformers with Hierarchical Attention", Machine Intelligence
Research 2024; first titled "Transformer in Convolutional Neural Networks") as in the official code
(``HAT_Net.py``): same architecture, configuration, initialisation and state_dict keys, the local
step of its hierarchical attention running on :func:`tokenmix.ops.window_attention`.

The network is NCHW throughout and normalises with GroupNorm(1, C) only: a stem (``patch_embed``:
3x3 stride-2 conv to 16 channels, GroupNorm, SiLU, 3x3 stride-2 conv), four stages of
:class:`HATBlock` in ``blocks[0..3]`` with a :class:`Downsample` (3x3 stride-2 conv, GroupNorm)
before stages 2 to 4 (``ds2``, ``ds3``, ``ds4``), global average pooling and ``classifier``
(dropout 0.2, Linear). A block is ``x + H-MHSA(x)``, then ``x + InvertedResidual(x)``.

H-MHSA (:class:`HierarchicalAttention`) on a map ``x`` of C channels, ``heads = C / head_dim``,
``s = head_dim ** -0.5``, ``G = grid_size``:

- local step: ``q, k, v = qkv(norm(x))``; within every non-overlapping ``G x G`` window,
  ``softmax(s q k^T) v``; ``grid_x = grid_norm(x + local)``.
- global step: ``p = ds_norm(avgpool_r(grid_x))`` (``r = ds_ratio``); every token of
  ``q(grid_x)`` attends to the tokens of ``k, v = kv(p)``: ``softmax(s q k^T) v``.
- output: ``proj(global + grid_x)``.

With ``G = 1`` (the last stage) it is plain multi-head attention over all tokens of
``qkv(norm(x))``, then ``proj``. The official local step reshapes the map into windows, so every
stage with ``G > 1`` needs H and W multiples of G: with the official configuration, inputs whose
sides are multiples of 224, or up to 3 pixels less (the stride-2 convs round them up to the same
maps), e.g. 224, 221 or 448. Other sizes raise ``ValueError`` here (the official code fails in its
reshape).

``fused=False`` builds the same model whose attention runs the official eager computation
(reshapes into windows, explicit scores and softmax, for both steps); the two share every
parameter, and a state_dict moves between them. ``HierarchicalAttention.fused`` can also be flipped
on a built model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmix.models import Backbone, build, default_cfg, register
from tokenmix.nn.shift import DropPath
from tokenmix.ops.window_attention import window_attention

__all__ = ["InvertedResidual", "HierarchicalAttention", "HATBlock", "Downsample", "HATNet", "hatnet_tiny"]

# Read by timm's register_model: timm's ViT cfg; the input size is fixed by the window grids.
default_cfgs = {"hatnet_tiny": default_cfg("HAT-Net_Tiny.pth", "patch_embed.0", crop_pct=0.9, fixed_input_size=True,
                                          classifier="classifier.1")}


class InvertedResidual(nn.Module):
    """The convolutional half of a block (the official keys): ``conv1`` (GroupNorm, 1x1 conv to
    ``hidden_dim``, activation), ``conv2`` (depthwise ``kernel_size`` conv, activation),
    ``conv3`` (1x1 conv to ``out_dim``, GroupNorm); channel dropout after conv2 and conv3. No
    conv has a bias. ``act_layer`` is called with ``inplace=True``, as in the official code."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int | None = None, kernel_size: int = 3,
                 drop: float = 0., act_layer: Callable[..., nn.Module] = nn.SiLU):
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
        self.drop = nn.Dropout2d(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.conv3(self.drop(self.conv2(self.conv1(x)))))


class HierarchicalAttention(nn.Module):
    """HAT-Net's H-MHSA (the official ``Attention``, same keys) on ``[B, dim, H, W]`` maps; the
    math is in the module docstring. Parameters: ``norm`` (GroupNorm), ``qkv`` (1x1 conv, dim ->
    3 dim), ``proj`` (1x1 conv), ``proj_norm`` (GroupNorm: in the official checkpoints, unused by
    the official forward and so here), and for ``grid_size > 1`` ``grid_norm``, ``ds_norm``
    (GroupNorms), ``q`` (1x1 conv), ``kv`` (1x1 conv, dim -> 2 dim). Channel ``c`` of q, k and v
    belongs to head ``c // head_dim``.

    ``proj_norm``'s parameters never receive a gradient, so they are created with
    ``requires_grad=False``: DistributedDataParallel then needs no ``find_unused_parameters``,
    and optimizers skip them as they skip the official ones (whose gradient stays ``None``).

    Fused, the local step is one :func:`tokenmix.ops.window_attention` call (no bias, no shift;
    the maps are multiples of the window, checked), reading q, k, v as views of the channels-last
    qkv map, and the global attention (of both kinds) is ``F.scaled_dot_product_attention``,
    which computes ``softmax(s q k^T) v`` as the official code does. ``fused=False`` runs the
    official eager reshapes, scores and softmax.

    Args:
        dim: channels; a multiple of ``head_dim``.
        head_dim: channels per head.
        grid_size: local window side ``G``; 1 for global attention only.
        ds_ratio: average-pooling kernel and stride for the global step's keys and values.
        drop: channel dropout after ``proj``.
        fused: keyword-only; ``False`` runs the official eager computation.
    """

    def __init__(self, dim: int, head_dim: int, grid_size: int = 1, ds_ratio: int = 1, drop: float = 0., *,
                 fused: bool = True):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"HierarchicalAttention: dim ({dim}) must be a multiple of head_dim ({head_dim})")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.grid_size = grid_size
        self.fused = fused
        self.norm = nn.GroupNorm(1, dim, eps=1e-6)
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_norm = nn.GroupNorm(1, dim, eps=1e-6).requires_grad_(False)
        self.drop = nn.Dropout2d(drop)
        if grid_size > 1:
            self.grid_norm = nn.GroupNorm(1, dim, eps=1e-6)
            self.avg_pool = nn.AvgPool2d(ds_ratio, stride=ds_ratio)
            self.ds_norm = nn.GroupNorm(1, dim, eps=1e-6)
            self.q = nn.Conv2d(dim, dim, 1)
            self.kv = nn.Conv2d(dim, dim * 2, 1)

    def _tokens(self, t: Tensor, n: int) -> tuple[Tensor, ...]:
        """``n`` per-head token tensors ``[B, heads, H*W, head_dim]`` from a ``[B, n dim, H, W]``
        map (views for contiguous and channels-last maps alike)."""
        B, _, H, W = t.shape
        return t.reshape(B, n, self.num_heads, self.head_dim, H * W).transpose(-2, -1).unbind(1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``softmax(s q k^T) v`` over ``[B, heads, L, head_dim]`` tokens."""
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v

    def _local(self, qkv: Tensor) -> Tensor:
        """The local step: attention within each ``G x G`` window of the ``[B, 3 dim, H, W]``
        qkv map; ``[B, dim, H, W]``."""
        B, C3, H, W = qkv.shape
        C, h, d, g = C3 // 3, self.num_heads, self.head_dim, self.grid_size
        if self.fused:
            # The op reads [B, H, W, heads, d] views whose last dim is contiguous: one copy to
            # channels-last (none when qkv already is), then q, k, v are strided views of it.
            q, k, v = qkv.permute(0, 2, 3, 1).reshape(B, H, W, 3, h, d).unbind(3)
            out = window_attention(q, k, v, window_size=g, scale=self.scale)
            return out.view(B, H, W, C).permute(0, 3, 1, 2)
        gh, gw = H // g, W // g
        # [B, 3, h, d, gh, g, gw, g] -> [3, B h gh gw, g g, d]: one row of tokens per window.
        t = qkv.reshape(B, 3, h, d, gh, g, gw, g).permute(1, 0, 2, 4, 6, 5, 7, 3).reshape(3, -1, g * g, d)
        out = self._attend(t[0], t[1], t[2])
        return out.reshape(B, h, gh, gw, g, g, d).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        if self.grid_size > 1:
            g = self.grid_size
            if H % g or W % g:
                raise ValueError(f"HierarchicalAttention: the map ({H} x {W}) must be a multiple of grid_size "
                                 f"{g} in both dims (HAT-Net's local windows tile the map)")
            grid_x = self.grid_norm(x + self._local(qkv))
            q, = self._tokens(self.q(grid_x), 1)
            k, v = self._tokens(self.kv(self.ds_norm(self.avg_pool(grid_x))), 2)
        else:
            q, k, v = self._tokens(qkv, 3)
        out = self._attend(q, k, v).transpose(-2, -1).reshape(B, C, H, W)
        if self.grid_size > 1:
            out = out + grid_x
        return self.drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, grid_size={self.grid_size}, fused={self.fused}"


class HATBlock(nn.Module):
    """HAT-Net's ``Block`` (the official keys): ``x + drop_path(attn(x))`` with
    :class:`HierarchicalAttention`, then ``x + drop_path(conv(x))`` with an
    :class:`InvertedResidual` of ``dim * expansion`` hidden channels.

    Args:
        dim, head_dim, grid_size, ds_ratio: the attention's (see :class:`HierarchicalAttention`).
        expansion: hidden-channel ratio of the inverted residual.
        drop: channel dropout in both halves.
        drop_path: stochastic depth rate.
        kernel_size: the inverted residual's depthwise kernel.
        act_layer: activation constructor (called with ``inplace=True``).
        fused: keyword-only; ``False`` runs the official eager attention.
    """

    def __init__(self, dim: int, head_dim: int, grid_size: int = 1, ds_ratio: int = 1, expansion: int = 4,
                 drop: float = 0., drop_path: float = 0., kernel_size: int = 3,
                 act_layer: Callable[..., nn.Module] = nn.SiLU, *, fused: bool = True):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.attn = HierarchicalAttention(dim, head_dim, grid_size=grid_size, ds_ratio=ds_ratio, drop=drop,
                                          fused=fused)
        self.conv = InvertedResidual(dim, hidden_dim=dim * expansion, out_dim=dim, kernel_size=kernel_size,
                                     drop=drop, act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.conv(x))


class Downsample(nn.Module):
    """Between stages: 3x3 stride-2 conv (padding 1: odd sides round up), GroupNorm."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=1, stride=2)
        self.norm = nn.GroupNorm(1, out_dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class HATNet(Backbone):
    """The HAT-Net network (the official ``HAT_Net`` signature; ``img_size`` is accepted and
    unused there too). Differences that change no result and no key: ``in_chans`` is honoured
    (the official stem always takes 3 channels), ``num_classes=0`` makes ``classifier[1]`` an
    ``nn.Identity``, the unused ``proj_norm`` parameters are frozen (see
    :class:`HierarchicalAttention`), the dropouts run out of place, and the timm model interface
    is added: ``forward_features`` returns the last-stage map ``[B, dims[3], H/32, W/32]`` (sides
    rounded up), ``forward_head`` pools it and applies ``classifier``; ``get_classifier`` and
    ``head`` give ``classifier[1]`` (the official key ``classifier.1`` is kept),
    ``reset_classifier`` replaces it; ``num_features``.

    Args beyond the official ones:
        fused: keyword-only; ``False`` runs every attention's official eager computation.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 dims: Sequence[int] = (64, 128, 256, 512), head_dim: int = 64,
                 expansions: Sequence[int] = (4, 4, 6, 6), grid_sizes: Sequence[int] = (1, 1, 1, 1),
                 ds_ratios: Sequence[int] = (8, 4, 2, 1), depths: Sequence[int] = (3, 4, 8, 3), drop_rate: float = 0.,
                 drop_path_rate: float = 0., act_layer: Callable[..., nn.Module] = nn.SiLU,
                 kernel_sizes: Sequence[int] = (3, 3, 3, 3), *, fused: bool = True):
        super().__init__()
        if not (len(dims) == len(expansions) == len(grid_sizes) == len(ds_ratios) == len(depths)
                == len(kernel_sizes) == 4):
            raise ValueError("HATNet: dims, expansions, grid_sizes, ds_ratios, depths and kernel_sizes need one "
                             "entry per stage (4)")
        self.num_classes, self.num_features = num_classes, dims[-1]
        self.depths = list(depths)
        self.patch_embed = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, stride=2),
                                         nn.GroupNorm(1, 16, eps=1e-6),
                                         act_layer(inplace=True),
                                         nn.Conv2d(16, dims[0], 3, padding=1, stride=2))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks = nn.ModuleList([nn.ModuleList([
            HATBlock(dims[i], head_dim, grid_size=grid_sizes[i], ds_ratio=ds_ratios[i], expansion=expansions[i],
                     drop=drop_rate, drop_path=rates[sum(depths[:i]) + j], kernel_size=kernel_sizes[i],
                     act_layer=act_layer, fused=fused)
            for j in range(depths[i])]) for i in range(4)])
        self.ds2 = Downsample(dims[0], dims[1])
        self.ds3 = Downsample(dims[1], dims[2])
        self.ds4 = Downsample(dims[2], dims[3])
        self.classifier = nn.Sequential(nn.Dropout(0.2),
                                        nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity())
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official ``_init_weights``: Linear and Conv2d weights truncated normal (std 0.02),
        their biases zero; norms at identity."""
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @property
    def head(self) -> nn.Module:
        """The final Linear, ``classifier[1]`` (read-only: :meth:`reset_classifier` replaces it)."""
        return self.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.classifier[1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the last stage's map ``[B, dims[3], ceil(H/32), ceil(W/32)]``."""
        x = self.patch_embed(x)
        for i, stage in enumerate(self.blocks):
            if i > 0:
                x = (self.ds2, self.ds3, self.ds4)[i - 1](x)
            x = self.run_blocks(stage, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling and the classifier's dropout, then its Linear unless
        ``pre_logits``."""
        x = self.classifier[0](F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x if pre_logits else self.classifier[1](x)


def _build(name: str, pretrained: bool, config: dict, kwargs: dict) -> HATNet:
    return build(name, HATNet, pretrained, config, kwargs, default_cfgs[name])


@register
def hatnet_tiny(pretrained: bool = False, **kwargs: Any) -> HATNet:
    """HAT-Net-Tiny: widths [48, 96, 240, 384], head_dim 48, expansions [8, 8, 4, 4], local
    windows [8, 7, 7, 1] (the last stage global only), pooling ratios [8, 4, 2, 1], depths
    [2, 2, 6, 3]; 12.7 M parameters."""
    config = dict(dims=[48, 96, 240, 384], head_dim=48, expansions=[8, 8, 4, 4], grid_sizes=[8, 7, 7, 1],
                  ds_ratios=[8, 4, 2, 1], depths=[2, 2, 6, 3])
    return _build("hatnet_tiny", pretrained, config, kwargs)
