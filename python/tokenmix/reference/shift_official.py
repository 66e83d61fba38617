"""Eager re-implementations of the official modules that mix tokens by shifts and rearrangements,
our own code written from reading the official repositories, with their constructor signatures and
state_dict key names, and module oracles ``forward(module, params, *inputs)`` for
``python -m tokenmix check``:

- Hire-MLP (official code: ``mlp_based/hire_mlp.py``): ``HireMLP`` and the whole
  ``HireMLPNet`` with ``hire_mlp_tiny``;
- CycleMLP (official code: ``cycle_mlp.py``): ``CycleFC``, through
  ``torchvision.ops.deform_conv2d`` with its fixed offsets, as the official code runs it;
- AS-MLP (official code: ``models/as_mlp.py``): ``AxialShift``, with the eager shift the official
  code keeps beside its CuPy kernel (``torch_shift``: pad, chunk, roll, narrow);
- RaftMLP (official code: ``libs/models.py``): ``PermutedBlock`` and the serial
  vertical/horizontal token mixer of ``SerialPermutedLevel`` (``raft_serial_token_mixer``), on
  token tensors ``[B, H*W, C]`` with einops' rearrangements spelled as reshape + permute.

Nothing in the library imports this module; tests and benchmarks do.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import init
from torch.nn.modules.utils import _pair

from tokenmix.nn.shift import DropPath as _DropPath  # stochastic depth: the same as timm's

__all__ = ["Mlp", "HireMLP", "HireBlock", "PatchEmbedOverlapping", "Downsample", "HireMLPNet", "hire_mlp_tiny",
           "CycleFC", "AxialShift", "torch_shift", "PermutedBlock", "Rearrange", "raft_serial_token_mixer",
           "map_to_tokens", "raft_output_to_map", "hire_mlp", "cycle_fc", "axial_shift", "raft_token_mixer"]


# ---- Hire-MLP --------------------------------------------------------------------------------

class Mlp(nn.Module):
    """Hire-MLP's two-layer MLP of 1x1 convolutions with GELU (keys ``fc1``, ``fc2``)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features or in_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features or in_features, out_features or in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class HireMLP(nn.Module):
    """Hire-MLP's token mixer: inner-region rearrangement along H and along W (after the
    cross-region roll by ``step``), a bottleneck MLP per branch, the channel branch ``mlp_c``, and
    split attention over the three branches."""

    def __init__(self, dim, attn_drop=0., proj_drop=0., pixel=2, step=1, step_pad_mode='c', pixel_pad_mode='c'):
        super().__init__()
        self.pixel, self.step = pixel, step
        self.step_pad_mode, self.pixel_pad_mode = step_pad_mode, pixel_pad_mode
        self.mlp_h1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_h1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_h2 = nn.Conv2d(dim // 2, dim * pixel, 1, bias=True)
        self.mlp_w1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_w1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_w2 = nn.Conv2d(dim // 2, dim * pixel, 1, bias=True)
        self.mlp_c = nn.Conv2d(dim, dim, 1, bias=True)
        self.act = nn.ReLU()
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, C, H, W = x.shape
        p, s = self.pixel, self.step
        pad_h, pad_w = (p - H % p) % p, (p - W % p) % p
        h, w = x.clone(), x.clone()
        if s:
            if self.step_pad_mode == '0':   # a zero-filled shift, never undone
                h = torch.narrow(F.pad(h, (0, 0, s, 0), "constant", 0), 2, 0, H)
                w = torch.narrow(F.pad(w, (s, 0, 0, 0), "constant", 0), 3, 0, W)
            elif self.step_pad_mode == 'c':
                h, w = torch.roll(h, s, -2), torch.roll(w, s, -1)
            else:
                raise NotImplementedError("Invalid pad mode.")
        if self.pixel_pad_mode == '0':
            h, w = F.pad(h, (0, 0, 0, pad_h), "constant", 0), F.pad(w, (0, pad_w, 0, 0), "constant", 0)
        elif self.pixel_pad_mode in ('c', 'replicate'):
            mode = 'circular' if self.pixel_pad_mode == 'c' else 'replicate'
            h, w = F.pad(h, (0, 0, 0, pad_h), mode=mode), F.pad(w, (0, pad_w, 0, 0), mode=mode)
        else:
            raise NotImplementedError("Invalid pad mode.")
        Hp, Wp = H + pad_h, W + pad_w
        h = h.reshape(B, C, Hp // p, p, W).permute(0, 1, 3, 2, 4).reshape(B, C * p, Hp // p, W)
        w = w.reshape(B, C, H, Wp // p, p).permute(0, 1, 4, 2, 3).reshape(B, C * p, H, Wp // p)
        h = self.mlp_h2(self.act(self.mlp_h1_norm(self.mlp_h1(h))))
        w = self.mlp_w2(self.act(self.mlp_w1_norm(self.mlp_w1(w))))
        h = h.reshape(B, C, p, Hp // p, W).permute(0, 1, 3, 2, 4).reshape(B, C, Hp, W)
        w = w.reshape(B, C, p, H, Wp // p).permute(0, 1, 3, 4, 2).reshape(B, C, H, Wp)
        h, w = torch.narrow(h, 2, 0, H), torch.narrow(w, 3, 0, W)
        if s and self.step_pad_mode == 'c':
            h, w = torch.roll(h, -s, -2), torch.roll(w, -s, -1)
        c = self.mlp_c(x)
        a = (h + w + c).flatten(2).mean(2).unsqueeze(2).unsqueeze(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(3).unsqueeze(3)
        return self.proj_drop(self.proj(h * a[0] + w * a[1] + c * a[2]))


class HireBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4., drop=0., attn_drop=0., drop_path=0., pixel=2, step=1,
                 step_pad_mode='c', pixel_pad_mode='c'):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = HireMLP(dim, attn_drop=attn_drop, pixel=pixel, step=step, step_pad_mode=step_pad_mode,
                            pixel_pad_mode=pixel_pad_mode)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = _DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbedOverlapping(nn.Module):
    """Conv (overlapping patches) + BatchNorm + ReLU."""

    def __init__(self, patch_size=16, stride=16, padding=0, in_chans=3, embed_dim=768, groups=1):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=_pair(stride),
                              padding=_pair(padding), groups=groups)
        self.norm = nn.BatchNorm2d(embed_dim)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.proj(x)))


class Downsample(nn.Module):
    """3x3 stride-2 conv + BatchNorm + ReLU between stages."""

    def __init__(self, in_embed_dim, out_embed_dim, patch_size):
        super().__init__()
        assert patch_size == 2, patch_size
        self.proj = nn.Conv2d(in_embed_dim, out_embed_dim, kernel_size=(3, 3), stride=(2, 2), padding=1)
        self.norm = nn.BatchNorm2d(out_embed_dim)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.proj(x)))


class HireMLPNet(nn.Module):
    """The official network: overlapping patch embedding, four stages of HireBlocks with
    Downsamples between them (one ``network`` ModuleList), BatchNorm, global mean, linear head. The
    step of block ``i`` of a stage is ``(i % step_stride) * step_dilation``."""

    def __init__(self, layers, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dims=None,
                 mlp_ratios=4., drop_rate=0., attn_drop_rate=0., drop_path_rate=0., pixel=(2, 2, 2, 2),
                 step_stride=(2, 2, 2, 2), step_dilation=(1, 1, 1, 1), step_pad_mode='c', pixel_pad_mode='c'):
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = PatchEmbedOverlapping(patch_size=7, stride=4, padding=2, in_chans=3,
                                                 embed_dim=embed_dims[0])
        network = []
        for i in range(len(layers)):
            blocks = []
            for j in range(layers[i]):
                dpr = drop_path_rate * (j + sum(layers[:i])) / (sum(layers) - 1)
                blocks.append(HireBlock(embed_dims[i], mlp_ratio=mlp_ratios[i], attn_drop=attn_drop_rate,
                                        drop_path=dpr, pixel=pixel[i],
                                        step=(j % step_stride[i]) * step_dilation[i],
                                        step_pad_mode=step_pad_mode, pixel_pad_mode=pixel_pad_mode))
            network.append(nn.Sequential(*blocks))
            if i < len(layers) - 1:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], 2))
        self.network = nn.ModuleList(network)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x):
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        return self.head(self.norm(x).flatten(2).mean(2))


def hire_mlp_tiny(**kwargs) -> HireMLPNet:
    return HireMLPNet([2, 2, 4, 2], embed_dims=[64, 128, 320, 512], patch_size=7, mlp_ratios=[4, 4, 4, 4],
                      pixel=[4, 3, 3, 2], step_stride=[2, 2, 3, 2], step_dilation=[2, 2, 1, 1],
                      step_pad_mode='c', pixel_pad_mode='c', **kwargs)


# ---- CycleMLP --------------------------------------------------------------------------------

class CycleFC(nn.Module):
    """CycleMLP's "staircase" FC: a 1x1 deformable convolution whose fixed offset moves channel
    ``i`` by ``(i + k//2) % k - k//2`` along the one axis of ``kernel_size`` that is not 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError('in_channels must be divisible by groups')
        if out_channels % groups != 0:
            raise ValueError('out_channels must be divisible by groups')
        if stride != 1:
            raise ValueError('stride must be 1')
        if padding != 0:
            raise ValueError('padding must be 0')
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.register_buffer('offset', self.gen_offset())
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_channels // groups)
            init.uniform_(self.bias, -bound, bound)

    def gen_offset(self) -> Tensor:
        kh, kw = self.kernel_size
        assert kh == 1 or kw == 1, self.kernel_size
        start = (kh * kw) // 2
        offset = torch.zeros(1, self.in_channels * 2, 1, 1)
        for i in range(self.in_channels):
            if kh == 1:
                offset[0, 2 * i + 1, 0, 0] = (i + start) % kw - kw // 2
            else:
                offset[0, 2 * i, 0, 0] = (i + start) % kh - kh // 2
        return offset

    def forward(self, input: Tensor) -> Tensor:
        from torchvision.ops import deform_conv2d
        B, _, H, W = input.shape
        return deform_conv2d(input, self.offset.expand(B, -1, H, W), self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation)


# ---- AS-MLP ----------------------------------------------------------------------------------

def torch_shift(x: Tensor, shift_size: int, dim: int) -> Tensor:
    """AS-MLP's eager shift: zero-pad by ``shift_size // 2`` on every side, roll the
    ``torch.chunk`` channel groups by ``-pad .. pad`` along ``dim``, crop back."""
    _, _, H, W = x.shape
    pad = shift_size // 2
    x = F.pad(x, (pad, pad, pad, pad), "constant", 0)
    parts = [torch.roll(xc, s, dim) for xc, s in zip(torch.chunk(x, shift_size, 1), range(-pad, pad + 1))]
    return torch.narrow(torch.narrow(torch.cat(parts, 1), 2, pad, H), 3, pad, W)


class AxialShift(nn.Module):
    """AS-MLP's axial shift: 1x1, GroupNorm(1), GELU; horizontal and vertical shifts each with
    their 1x1 and GELU, summed; GroupNorm(1); 1x1. (``proj_drop`` is accepted and unused, as in
    the official code.)"""

    def __init__(self, dim, shift_size, as_bias=True, proj_drop=0.):
        super().__init__()
        self.dim, self.shift_size, self.pad = dim, shift_size, shift_size // 2
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv2_2 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv3 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.actn = nn.GELU()
        self.norm1 = nn.GroupNorm(1, dim)
        self.norm2 = nn.GroupNorm(1, dim)

    def forward(self, x):
        x = self.actn(self.norm1(self.conv1(x)))
        x_lr = self.actn(self.conv2_1(torch_shift(x, self.shift_size, 3)))
        x_td = self.actn(self.conv2_2(torch_shift(x, self.shift_size, 2)))
        return self.conv3(self.norm2(x_lr + x_td))


# ---- RaftMLP ---------------------------------------------------------------------------------

class Rearrange(nn.Module):
    """The einops rearrangements the serial level uses, on ``[b, rows, features]`` tensors.

    ``kind``: ``"to_vertical"`` ``b (h w) (chw co) -> b (co w) (chw h)``, ``"to_horizontal"``
    ``b (co w) (chw h) -> b (co h) (chw w)``, ``"to_tokens"`` ``b (co h) (chw w) -> b (h w) (chw co)``.
    """

    def __init__(self, kind: str, h: int, w: int, chw: int):
        super().__init__()
        self.kind, self.h, self.w, self.chw = kind, h, w, chw

    def forward(self, x):
        b, h, w, r = x.shape[0], self.h, self.w, self.chw
        if self.kind == "to_vertical":
            co = x.shape[2] // r
            return x.reshape(b, h, w, r, co).permute(0, 4, 2, 3, 1).reshape(b, co * w, r * h)
        if self.kind == "to_horizontal":
            co = x.shape[1] // w
            return x.reshape(b, co, w, r, h).permute(0, 1, 4, 3, 2).reshape(b, co * h, r * w)
        co = x.shape[1] // h
        return x.reshape(b, co, h, r, w).permute(0, 2, 4, 3, 1).reshape(b, h * w, r * co)


class PermutedBlock(nn.Module):
    """RaftMLP's raft token-mixing block on ``[b, (co o1), (chw o2)]``: LayerNorm over the
    channels (``co * raft_size + chw``), then an MLP over the ``raft_size * spatial_dim`` features
    of each raft (``chw * spatial_dim + o2``), residual."""

    def __init__(self, spatial_dim, channels, raft_size, expansion_factor=4, dropout=0.0, drop_path_rate=0.0):
        super().__init__()
        self.spatial_dim, self.channels, self.raft_size = spatial_dim, channels, raft_size
        dim = spatial_dim * raft_size
        # Registration order as the official Block: norm (replaced by the subclass), drop, fn.
        self.norm = nn.Sequential(nn.Identity(), nn.LayerNorm(channels), nn.Identity())
        self.drop = _DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.fn = nn.Sequential(nn.Linear(dim, dim * expansion_factor), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim * expansion_factor, dim), nn.Dropout(dropout))

    def _norm(self, x):
        b, c1, c2, o2 = x.shape[0], self.channels // self.raft_size, self.raft_size, self.spatial_dim
        o1 = x.shape[1] // c1
        t = x.reshape(b, c1, o1, c2, o2).permute(0, 2, 4, 1, 3).reshape(b, o1 * o2, c1 * c2)
        t = self.norm[1](t)
        return t.reshape(b, o1, o2, c1, c2).permute(0, 3, 1, 4, 2).reshape(b, c1 * o1, c2 * o2)

    def forward(self, x):
        return self.drop(self.fn(self._norm(x))) + x


def raft_serial_token_mixer(channels: int, h: int, w: int, raft_size: int, expansion_factor: int = 4,
                            dropout: float = 0.0, drop_path_rate: float = 0.0) -> nn.Sequential:
    """Entries 0-3 of one depth of ``SerialPermutedLevel``'s Sequential (state_dict keys
    ``1.norm.1.*``, ``1.fn.0.*``, ``1.fn.3.*``, ``3.*``): tokens ``b (h w) c`` in,
    ``b (co h) (chw w)`` out."""
    return nn.Sequential(Rearrange("to_vertical", h, w, raft_size),
                         PermutedBlock(h, channels, raft_size, expansion_factor, dropout, drop_path_rate),
                         Rearrange("to_horizontal", h, w, raft_size),
                         PermutedBlock(w, channels, raft_size, expansion_factor, dropout, drop_path_rate))


def map_to_tokens(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``b (h w) c``."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def raft_output_to_map(y: Tensor, h: int, w: int, raft_size: int) -> Tensor:
    """``b (co h) (chw w)`` -> ``[B, C, H, W]`` with channel ``chw * co_count + co``."""
    b, co = y.shape[0], y.shape[1] // h
    return y.reshape(b, co, h, raft_size, w).permute(0, 3, 1, 2, 4).reshape(b, raft_size * co, h, w)


# ---- module oracles: forward(module, params, *inputs) ----------------------------------------
# Each builds the official module with the tokenmix module's configuration and runs it through
# torch.func.functional_call with the given parameters and the tokenmix module's buffers (cast to
# the input's dtype and device), in the tokenmix module's train/eval mode.

Params = Dict[str, Tensor]


def _run(official: nn.Module, mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    state = dict(p)
    for k, b in mod.named_buffers():
        if b.is_floating_point():
            state[k] = b.to(x.device, x.dtype)
        elif not k.endswith("num_batches_tracked"):
            state[k] = b.to(x.device)
    official.train(mod.training).to(x.device)
    return functional_call(official, state, (x,))


def hire_mlp(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.HireMLP``."""
    dim = mod.mlp_c.in_channels
    official = HireMLP(dim, pixel=mod.pixel, step=mod.step, step_pad_mode=mod.step_pad_mode,
                       pixel_pad_mode=mod.pixel_pad_mode)
    return _run(official, mod, p, x)


def cycle_fc(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.CycleFC`` as CycleMLP computes it: a 1x1 deformable convolution with the
    fixed offsets broadcast to every position; the deformable convolution is tokenmix's eager
    oracle of torchvision's (which has no CPU kernel for bf16)."""
    from tokenmix.reference.deform_conv2d import deform_conv2d
    B, _, H, W = x.shape
    offset = mod.offset.to(x.device, x.dtype).expand(B, -1, H, W)
    return deform_conv2d(x, offset, p["weight"], p.get("bias"), stride=1, padding=0, dilation=mod.dilation)


def axial_shift(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.AxialShift`` with AS-MLP's eager shift."""
    return _run(AxialShift(mod.dim, mod.shift_size, mod.conv1.bias is not None), mod, p, x)


def raft_token_mixer(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.RaftTokenMixer`` on a ``[B, C, H, W]`` map: the official token-layout mixer
    between the map's rearrangements."""
    v, hz = mod[1], mod[3]
    official = raft_serial_token_mixer(v.channels, v.spatial_dim, hz.spatial_dim, v.raft_size,
                                       v.fn[0].out_features // v.fn[0].in_features)
    y = _run(official, mod, p, map_to_tokens(x))
    return raft_output_to_map(y, v.spatial_dim, hz.spatial_dim, v.raft_size)
