"""Hire-MLP (Guo et al., "Hire-MLP: Vision MLP via Hierarchical Rearrangement", CVPR 2022) as in
the official code (``mlp_based/hire_mlp.py``): same architecture, configuration,
initialisation and state_dict keys, its token mixers being :class:`tokenmix.nn.HireMLP`.

The network is NCHW throughout: an overlapping patch embedding (7x7 stride-4 conv, BatchNorm,
ReLU), four stages of :class:`HireBlock` (BatchNorm, token mixer, residual; BatchNorm, conv MLP,
residual) with a :class:`Downsample` (3x3 stride-2 conv, BatchNorm, ReLU) between stages, all in
one ``network`` ModuleList (stages at even indices), then BatchNorm, global mean and the ``head``.
Block ``j`` of stage ``i`` shifts its regions by ``(j % step_stride[i]) * step_dilation[i]``.

``fused=False`` builds the same model whose token mixers run the official eager computation
(rolls, pads, reshapes and convolutions): the two share every parameter and buffer, and a
state_dict moves between them. ``HireMLP.fused`` can also be flipped on a built model.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from tokenmix.models import Backbone, build, default_cfg, register
from tokenmix.nn.shift import ConvMlp, DropPath, HireMLP

__all__ = ["HireBlock", "PatchEmbedOverlapping", "Downsample", "HireMLPNet", "hire_mlp_tiny"]

# Read by timm's register_model.
default_cfgs = {"hire_mlp_tiny": default_cfg("hire_mlp_tiny.pth", "patch_embed.proj", crop_pct=0.9)}


class HireBlock(nn.Module):
    """``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``; BatchNorms,
    :class:`~tokenmix.nn.HireMLP` token mixer, :class:`~tokenmix.nn.shift.ConvMlp` channel MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 4., drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., pixel: int = 2, step: int = 1, step_pad_mode: str = 'c',
                 pixel_pad_mode: str = 'c', *, fused: bool = True):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = HireMLP(dim, attn_drop=attn_drop, pixel=pixel, step=step, step_pad_mode=step_pad_mode,
                            pixel_pad_mode=pixel_pad_mode, fused=fused)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbedOverlapping(nn.Module):
    """Overlapping patch embedding: conv (``patch_size`` kernel, ``stride``, ``padding``),
    BatchNorm, ReLU."""

    def __init__(self, patch_size=16, stride=16, padding=0, in_chans: int = 3, embed_dim: int = 768,
                 groups: int = 1):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=_pair(stride),
                              padding=_pair(padding), groups=groups)
        self.norm = nn.BatchNorm2d(embed_dim)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class Downsample(nn.Module):
    """Between stages: 3x3 stride-2 conv, BatchNorm, ReLU (``patch_size`` must be 2)."""

    def __init__(self, in_embed_dim: int, out_embed_dim: int, patch_size: int):
        super().__init__()
        if patch_size != 2:
            raise ValueError(f"Downsample: patch_size must be 2, got {patch_size}")
        self.proj = nn.Conv2d(in_embed_dim, out_embed_dim, kernel_size=(3, 3), stride=(2, 2), padding=1)
        self.norm = nn.BatchNorm2d(out_embed_dim)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class HireMLPNet(Backbone):
    """The Hire-MLP network (the official ``HireMLPNet`` signature; ``img_size``, ``patch_size``
    and ``drop_rate`` are accepted and unused there too). Differences that change no result and
    no key: ``in_chans`` is honoured (the official code always builds 3 input channels), and the
    timm model interface is added (``forward_features``, ``forward_head``, ``get_classifier``,
    ``reset_classifier``, ``num_features``).

    Args beyond the official ones:
        fused: keyword-only; ``False`` runs every token mixer's official eager formulation.
    """

    def __init__(self, layers: Sequence[int], img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., pixel: Sequence[int] = (2, 2, 2, 2),
                 step_stride: Sequence[int] = (2, 2, 2, 2), step_dilation: Sequence[int] = (1, 1, 1, 1),
                 step_pad_mode: str = 'c', pixel_pad_mode: str = 'c', *, fused: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.patch_embed = PatchEmbedOverlapping(patch_size=7, stride=4, padding=2, in_chans=in_chans,
                                                 embed_dim=embed_dims[0])
        depth, network = sum(layers), []
        for i, n in enumerate(layers):
            blocks = [HireBlock(embed_dims[i], mlp_ratio=mlp_ratios[i], attn_drop=attn_drop_rate,
                                drop_path=drop_path_rate * (j + sum(layers[:i])) / (depth - 1), pixel=pixel[i],
                                step=(j % step_stride[i]) * step_dilation[i], step_pad_mode=step_pad_mode,
                                pixel_pad_mode=pixel_pad_mode, fused=fused)
                      for j in range(n)]
            network.append(nn.Sequential(*blocks))
            if i < len(layers) - 1:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], 2))
        self.network = nn.ModuleList(network)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official ``cls_init_weights``: truncated normal (std 0.02) weights and zero biases
        for Linear and Conv2d, BatchNorm at identity."""
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the normalised last-stage map ``[B, 512, H/32, W/32]``."""
        x = self.patch_embed(x)
        for i, part in enumerate(self.network):
            x = self.run_blocks(part, x) if i % 2 == 0 else part(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.flatten(2).mean(2)
        return x if pre_logits else self.head(x)


def _build(name: str, pretrained: bool, config: dict, kwargs: dict) -> HireMLPNet:
    return build(name, HireMLPNet, pretrained, config, kwargs, default_cfgs[name])


@register
def hire_mlp_tiny(pretrained: bool = False, **kwargs: Any) -> HireMLPNet:
    """Hire-MLP-Tiny: layers [2, 2, 4, 2], widths [64, 128, 320, 512], MLP ratio 4, region sizes
    [4, 3, 3, 2], steps every [2, 2, 3, 2] blocks by [2, 2, 1, 1]; 18.0 M parameters."""
    config = dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], patch_size=7, mlp_ratios=[4, 4, 4, 4],
                  pixel=[4, 3, 3, 2], step_stride=[2, 2, 3, 2], step_dilation=[2, 2, 1, 1], step_pad_mode='c',
                  pixel_pad_mode='c')
    return _build("hire_mlp_tiny", pretrained, config, kwargs)
