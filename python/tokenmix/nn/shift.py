r"""Token mixers built on shifts and rearrangements, state_dict-compatible with the official code:
Hire-MLP's ``HireMLP``, CycleMLP's ``CycleFC``, AS-MLP's ``AxialShift`` and RaftMLP's raft
token-mixing blocks (``PermutedBlock``, and ``RaftTokenMixer``, its serial vertical / horizontal
pair). The shift or fold next to each 1x1 projection runs inside the projection's GEMM
(``tokenmix.ops.shift_linear``, ``region_fold_linear``, ``linear_region_unfold``), so the
shifted, padded or folded maps of the official code never exist.

Every module takes and returns ``[B, C, H, W]`` maps, NCHW or channels_last.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from tokenmix.ops.deform_conv2d import deform_conv2d
from tokenmix.ops.shift import linear_region_unfold, region_fold_linear, shift_linear

__all__ = ["HireMLP", "ConvMlp", "DropPath", "CycleFC", "AxialShift", "PermutedBlock", "RaftTokenMixer",
           "cycle_fc_offsets", "chunk_sizes"]


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): in training, each sample's branch is
    zeroed with probability ``p`` and the kept ones scaled by ``1 / (1 - p)``. No state."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvMlp(nn.Module):
    """Hire-MLP's ``Mlp``: ``fc2(drop(gelu(fc1(x))))`` then ``drop``, with 1x1 convolutions (keys
    ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, drop: float = 0.0):
        super().__init__()
        hidden = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, out_features or in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def forward_rows(self, x: Tensor) -> Tensor:
        """The same MLP on ``[N, in_features]`` rows, the pixels of a 1 x 1 map, as the linear
        layers it is there: a convolution on such a map costs tens of microseconds of setup per
        call, forward and backward, where ``F.linear`` is one small matrix product."""
        x = self.drop(self.act(F.linear(x, self.fc1.weight.flatten(1), self.fc1.bias)))
        return self.drop(F.linear(x, self.fc2.weight.flatten(1), self.fc2.bias))


# ---- Hire-MLP --------------------------------------------------------------------------------


def _pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1, stride-1, ungrouped convolution (``weight`` [O, C, 1, 1]) as one batched matrix
    product ``W x + b`` over the pixels, ``[B, C, H, W] -> [B, O, H, W]``. PyTorch's CPU
    convolution runs a 1x1 through im2col, which first copies the input."""
    B, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    out = weight.shape[0]
    w = weight.view(out, C).expand(B, out, C)
    pixels = x.reshape(B, C, H * W)
    y = torch.bmm(w, pixels) if bias is None else torch.baddbmm(bias.view(1, out, 1), w, pixels)
    return y.view(B, out, H, W)


def _weighted_sum(h: Tensor, w: Tensor, c: Tensor, a: Tensor, batched_from: int = 1024) -> Tensor:
    r"""Hire-MLP's split-attention mix :math:`a_0 h + a_1 w + a_2 c`, with ``a`` ``[3, B, C]``
    weights per image and channel, accumulated into one buffer.

    When autograd records it and the planes have at least ``batched_from`` pixels, the products
    are batched over the ``B C`` planes: autograd then takes each weight's gradient as one dot
    product per plane, where a broadcast product's backward writes a full-size product and sums
    it. A batched product costs a fixed time per plane, which smaller planes do not repay. Those
    products run in the dtype of the first one (the autocast dtype under autocast)."""
    B, C, H, W = c.shape[0], c.shape[1], c.shape[2], c.shape[3]
    if H * W < batched_from or not torch.is_grad_enabled():
        k = a[:, :, :, None, None]
        return (c * k[2]).addcmul_(h, k[0]).addcmul_(w, k[1])
    planes = a.reshape(3, B * C, 1, 1)
    mixed = torch.bmm(planes[2], c.reshape(B * C, 1, H * W))
    dt = mixed.dtype
    mixed.baddbmm_(planes[0].to(dt), h.reshape(B * C, 1, H * W).to(dt))
    mixed.baddbmm_(planes[1].to(dt), w.reshape(B * C, 1, H * W).to(dt))
    return mixed.view(B, C, H, W)


def _step_shift(t: Tensor, axis: int, step: int, mode: str) -> Tensor:
    """Hire-MLP's cross-region step before the fold: a roll (``'c'``), or a shift by ``step``
    that fills zeros and drops what leaves the map (``'0'``)."""
    if step == 0:
        return t
    if mode == 'c':
        return torch.roll(t, step, axis)
    L = t.shape[axis]
    pad = [step, 0, 0, 0] if axis == 3 else [0, 0, step, 0]
    return torch.narrow(F.pad(t, pad), axis, 0, L)


def _fold_eager(t: Tensor, axis: int, p: int, step: int, step_mode: str, pad_mode: str) -> Tensor:
    """The official inner-region rearrangement, step by step: step shift, pad the axis at its end
    to a multiple of ``p`` (circular, zeros or replicate), fold ``p`` positions into channels."""
    B, C, H, W = t.shape
    t = _step_shift(t, axis, step, step_mode)
    L = t.shape[axis]
    extra = (p - L % p) % p
    pad = [0, extra, 0, 0] if axis == 3 else [0, 0, 0, extra]
    if pad_mode == '0':
        t = F.pad(t, pad)
    else:
        t = F.pad(t, pad, mode='circular' if pad_mode == 'c' else 'replicate')
    n = (L + extra) // p
    if axis == 2:
        return t.reshape(B, C, n, p, W).permute(0, 1, 3, 2, 4).reshape(B, C * p, n, W)
    return t.reshape(B, C, H, n, p).permute(0, 1, 4, 2, 3).reshape(B, C * p, H, n)


def _unfold_eager(t: Tensor, axis: int, p: int, size: int, step: int, step_mode: str) -> Tensor:
    """The inverse rearrangement: unfold, crop to ``size``, undo a ``'c'`` step (a ``'0'`` step
    is not undone, as in the official code)."""
    B, Cp, A, D = t.shape
    C = Cp // p
    if axis == 2:
        t = t.reshape(B, C, p, A, D).permute(0, 1, 3, 2, 4).reshape(B, C, A * p, D)
    else:
        t = t.reshape(B, C, p, A, D).permute(0, 1, 3, 4, 2).reshape(B, C, A, D * p)
    t = torch.narrow(t, axis, 0, size)
    if step != 0 and step_mode == 'c':
        t = torch.roll(t, -step, axis)
    return t


class HireMLP(nn.Module):
    r"""Hire-MLP's token mixer (keys as the official ``HireMLP``: ``mlp_h1``, ``mlp_h1_norm``,
    ``mlp_h2``, ``mlp_w1``, ``mlp_w1_norm``, ``mlp_w2``, ``mlp_c``, ``reweight.fc1``,
    ``reweight.fc2``, ``proj``).

    With :math:`p` = ``pixel``, :math:`s` = ``step`` and
    :math:`\mathrm{fold}_a = \mathrm{region\_fold}(\cdot, a, p, s)` (roll by :math:`s`, circular
    padding to a multiple of :math:`p`, :math:`p` positions folded into channels) and
    :math:`\mathrm{unfold}_a` its inverse (crop, roll by :math:`-s`):

    .. math::
        h &= \mathrm{unfold}_2\bigl(W_{h2}\,\mathrm{relu}(\mathrm{BN}_h(W_{h1}\,\mathrm{fold}_2(x))) + b_{h2}\bigr)\\
        w &= \mathrm{unfold}_3\bigl(W_{w2}\,\mathrm{relu}(\mathrm{BN}_w(W_{w1}\,\mathrm{fold}_3(x))) + b_{w2}\bigr),
        \qquad c = W_c x + b_c\\
        a &= \mathrm{softmax}_{3}\bigl(\mathrm{reweight}(\mathrm{mean}_{HW}(h + w + c))\bigr),\qquad
        \mathrm{out} = \mathrm{proj}(a_0 h + a_1 w + a_2 c)

    The fold and the first 1x1 run as one ``region_fold_linear``, the second 1x1 and the unfold as
    one ``linear_region_unfold``, and the channel branch and ``proj`` as batched matrix products
    (no im2col copy): this is exactly the official roll, circular pad, reshape,
    permute, conv, ..., narrow, roll when ``step_pad_mode == pixel_pad_mode == 'c'`` (the
    configuration of every released Hire-MLP). The BatchNorms stay ``nn.BatchNorm2d`` modules, so
    train / eval mode and the running statistics behave as in the official module.

    Other pad modes (``step_pad_mode='0'``: a zero-filled shift that is never undone;
    ``pixel_pad_mode='0'`` or ``'replicate'``) are not what the fused ops compute; with them, or
    with ``fused=False``, the module runs the official eager computation (``_forward_eager``). A
    ``step`` of 0 makes ``step_pad_mode`` irrelevant.

    Args:
        dim: channels (even).
        attn_drop: accepted and unused, as in the official module.
        proj_drop: dropout after ``proj``.
        pixel: region size ``p`` of the inner-region rearrangement.
        step: cross-region shift ``s`` (any integer).
        step_pad_mode: ``'c'`` (roll) or ``'0'``.
        pixel_pad_mode: ``'c'`` (circular), ``'0'`` or ``'replicate'``.
        fused: keyword-only; ``False`` runs the official eager formulation (for comparisons;
            same parameters, same results).
    """

    def __init__(self, dim: int, attn_drop: float = 0., proj_drop: float = 0., pixel: int = 2, step: int = 1,
                 step_pad_mode: str = 'c', pixel_pad_mode: str = 'c', *, fused: bool = True):
        super().__init__()
        if step_pad_mode not in ('0', 'c'):
            raise ValueError(f"HireMLP: step_pad_mode must be '0' or 'c', got {step_pad_mode!r}")
        if pixel_pad_mode not in ('0', 'c', 'replicate'):
            raise ValueError(f"HireMLP: pixel_pad_mode must be '0', 'c' or 'replicate', got {pixel_pad_mode!r}")
        self.pixel, self.step = pixel, step
        self.step_pad_mode, self.pixel_pad_mode = step_pad_mode, pixel_pad_mode
        self.fused = fused
        # Whether the fused ops compute exactly the official rearrangement for these modes.
        self.fusable = pixel_pad_mode == 'c' and (step_pad_mode == 'c' or step == 0)
        self.mlp_h1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_h1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_h2 = nn.Conv2d(dim // 2, dim * pixel, 1, bias=True)
        self.mlp_w1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_w1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_w2 = nn.Conv2d(dim // 2, dim * pixel, 1, bias=True)
        self.mlp_c = nn.Conv2d(dim, dim, 1, bias=True)
        self.act = nn.ReLU()
        self.reweight = ConvMlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def _forward_fused(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        H, W = x.shape[2], x.shape[3]
        p, s = self.pixel, self.step
        h = region_fold_linear(x, 2, p, self.mlp_h1.weight, self.mlp_h1.bias, s)
        h = linear_region_unfold(self.act(self.mlp_h1_norm(h)), 2, p, H, self.mlp_h2.weight, self.mlp_h2.bias, s)
        w = region_fold_linear(x, 3, p, self.mlp_w1.weight, self.mlp_w1.bias, s)
        w = linear_region_unfold(self.act(self.mlp_w1_norm(w)), 3, p, W, self.mlp_w2.weight, self.mlp_w2.bias, s)
        return h, w

    def _forward_eager(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        H, W = x.shape[2], x.shape[3]
        p, s, sm, pm = self.pixel, self.step, self.step_pad_mode, self.pixel_pad_mode
        h = self.mlp_h2(self.act(self.mlp_h1_norm(self.mlp_h1(_fold_eager(x, 2, p, s, sm, pm)))))
        w = self.mlp_w2(self.act(self.mlp_w1_norm(self.mlp_w1(_fold_eager(x, 3, p, s, sm, pm)))))
        return _unfold_eager(h, 2, p, H, s, sm), _unfold_eager(w, 3, p, W, s, sm)

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[0], x.shape[1]
        fused = self.fused and self.fusable
        h, w = self._forward_fused(x) if fused else self._forward_eager(x)
        c = _pointwise(x, self.mlp_c.weight, self.mlp_c.bias) if fused else self.mlp_c(x)
        # Split attention: a softmax over the three branches, per channel. Fused, the mean of the
        # sum is the sum of the planes' sums over H W (whose backward is a broadcast view, where a
        # mean's writes a full-size quotient), the reweighting MLP runs on the [B, C] means as
        # linear layers (ConvMlp.forward_rows), and the weighted sum accumulates into one buffer
        # (_weighted_sum); the same values up to rounding.
        if fused:
            a = (h.sum((2, 3)) + w.sum((2, 3)) + c.sum((2, 3))) / (x.shape[2] * x.shape[3])
            a = self.reweight.forward_rows(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)
            mixed = _weighted_sum(h, w, c, a)
            return self.proj_drop(_pointwise(mixed, self.proj.weight, self.proj.bias))
        a = (h + w + c).flatten(2).mean(2)[:, :, None, None]
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)
        a = a[:, :, :, None, None]
        mixed = h * a[0] + w * a[1] + c * a[2]
        return self.proj_drop(self.proj(mixed))

    def extra_repr(self) -> str:
        return (f"dim={self.mlp_c.in_channels}, pixel={self.pixel}, step={self.step}, "
                f"step_pad_mode={self.step_pad_mode!r}, pixel_pad_mode={self.pixel_pad_mode!r}, "
                f"fused={self.fused and self.fusable}")


# ---- CycleMLP --------------------------------------------------------------------------------

def cycle_fc_offsets(channels: int, kernel_size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """CycleFC's fixed per-channel sampling offsets ``(dy, dx)``: channel ``i`` reads
    ``(i + k//2) % k - k//2`` positions away along the axis whose ``kernel_size`` is not 1."""
    kh, kw = kernel_size
    if kh != 1 and kw != 1:
        raise ValueError(f"CycleFC: kernel_size must be (1, k) or (k, 1), got {tuple(kernel_size)}")
    k = kh * kw
    steps = [(i + k // 2) % k - k // 2 for i in range(channels)]
    return [(0, d) for d in steps] if kh == 1 else [(d, 0) for d in steps]


class CycleFC(nn.Module):
    r"""CycleMLP's ``CycleFC`` (keys ``weight`` ``[out, in // groups, 1, 1]``, ``bias``, buffer
    ``offset`` ``[1, 2 * in, 1, 1]``): a 1x1 projection in which input channel :math:`c` is read
    at a fixed offset :math:`(\Delta y_c, \Delta x_c)`, zero outside the map:

    .. math::
        \mathrm{out}[b, o, h, w] = \mathrm{bias}_o + \sum_c W_{o c}\, x[b, c, h + \Delta y_c, w + \Delta x_c]

    The official code runs this as ``torchvision.ops.deform_conv2d`` with the offsets broadcast
    to every position (integer offsets: the bilinear sampling is exact). Here it is
    ``shift_linear`` with one group per channel and shifts :math:`-(\Delta y_c, \Delta x_c)`
    (``shift_tokens`` reads ``x[h - dy]``). With ``groups > 1`` it falls back to
    ``tokenmix.ops.deform_conv2d`` with the official offsets. ``dilation`` does nothing to a 1x1
    kernel (kept for the signature); ``stride`` and ``padding`` must be 1 and 0, as officially.

    The shifts are fixed by ``in_channels`` and ``kernel_size`` at construction; the ``offset``
    buffer is kept for state_dict compatibility (an official checkpoint holds the same values).
    """

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
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = groups
        offsets = cycle_fc_offsets(in_channels, self.kernel_size)
        self.shifts: List[Tuple[int, int]] = [(-dy, -dx) for dy, dx in offsets]
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 1, 1))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter('bias', None)
        self.register_buffer('offset', torch.tensor(offsets, dtype=torch.float32).reshape(1, 2 * in_channels, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels // self.groups)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:
            # One group per channel: ``groups=None`` with C shifts means C groups of 1.
            return shift_linear(x, self.shifts, self.weight, self.bias, None, "zeros")
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        offset = self.offset.to(x.dtype).expand(B, -1, H, W)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", groups={self.groups}" if self.groups != 1 else ""
        return s + (", bias=False" if self.bias is None else "")


# ---- AS-MLP ----------------------------------------------------------------------------------

def chunk_sizes(channels: int, chunks: int) -> List[int]:
    """The sizes of ``torch.chunk(x, chunks, 1)`` for ``channels`` channels: chunks of
    ``ceil(channels / chunks)``, the last one smaller, and fewer than ``chunks`` of them when
    ``channels`` is small (e.g. 10 channels in 4 chunks: 3, 3, 3, 1; 6 in 5: 2, 2, 2)."""
    size = -(-channels // chunks)
    n = -(-channels // size)
    return [size] * (n - 1) + [channels - size * (n - 1)]


class AxialShift(nn.Module):
    r"""AS-MLP's axial shift (keys as the official ``AxialShift``: ``conv1``, ``norm1``,
    ``conv2_1``, ``conv2_2``, ``norm2``, ``conv3``; the norms are ``GroupNorm(1, dim)``):

    .. math::
        y &= \mathrm{gelu}(\mathrm{GN}_1(W_1 x + b_1))\\
        \mathrm{out} &= W_3\,\mathrm{GN}_2\bigl(\mathrm{gelu}(W_{21}\,S_{\leftrightarrow}(y) + b_{21})
            + \mathrm{gelu}(W_{22}\,S_{\updownarrow}(y) + b_{22})\bigr) + b_3

    where :math:`S` splits the channels as ``torch.chunk(y, shift_size, 1)`` does (``chunk_sizes``:
    possibly fewer, and a smaller last one) and shifts chunk :math:`i` by
    :math:`s_i = i - \lfloor shift\_size / 2 \rfloor` along W (:math:`S_\leftrightarrow`) or H
    (:math:`S_\updownarrow`), zeros entering: :math:`S(y)[c, h] = y[c, h - s_i]`, the sign of the
    official roll inside its zero-padded map (and of its CUDA kernel). Each shift + 1x1 is one
    ``shift_linear``. ``proj_drop`` is accepted and unused, as in the official module.
    """

    def __init__(self, dim: int, shift_size: int, as_bias: bool = True, proj_drop: float = 0.):
        super().__init__()
        self.dim, self.shift_size, self.pad = dim, shift_size, shift_size // 2
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv2_2 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv3 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.actn = nn.GELU()
        self.norm1 = nn.GroupNorm(1, dim)
        self.norm2 = nn.GroupNorm(1, dim)
        self.groups: List[int] = chunk_sizes(dim, shift_size)
        steps = [i - self.pad for i in range(len(self.groups))]
        self.shifts_lr: List[Tuple[int, int]] = [(0, s) for s in steps]
        self.shifts_td: List[Tuple[int, int]] = [(s, 0) for s in steps]

    def forward(self, x: Tensor) -> Tensor:
        x = self.actn(self.norm1(self.conv1(x)))
        x_lr = self.actn(shift_linear(x, self.shifts_lr, self.conv2_1.weight, self.conv2_1.bias, self.groups, "zeros"))
        x_td = self.actn(shift_linear(x, self.shifts_td, self.conv2_2.weight, self.conv2_2.bias, self.groups, "zeros"))
        return self.conv3(self.norm2(x_lr + x_td))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, shift_size={self.shift_size}, groups={self.groups}"


# ---- RaftMLP ---------------------------------------------------------------------------------

class PermutedBlock(nn.Module):
    r"""RaftMLP's raft token-mixing block (``libs/models.py``; keys ``norm.1.weight``,
    ``norm.1.bias``, ``fn.0.*``, ``fn.3.*``), on a ``[B, C, H, W]`` map.

    The channels form ``r = raft_size`` interleaved rafts of ``C / r``: channel
    :math:`c = j\,C/r + i` is member :math:`j` of raft :math:`i` (RaftMLP's ``(chw co)``). With
    ``axis=2`` (vertical) the feature vector of raft :math:`i` at column :math:`w` is
    :math:`f_{jH + h} = \mathrm{LN}(x)[j\,C/r + i, h, w]`, :math:`r H` features; with ``axis=3``
    (horizontal) the same with rows and columns exchanged. Then

    .. math::
        \mathrm{out} = x + \mathrm{unfeature}\bigl(W_2\,\mathrm{gelu}(W_1 f + b_1) + b_2\bigr)

    with the weights shared by every raft and every column (row). ``LN`` is a LayerNorm over the
    channels; its weight is indexed officially by :math:`i\,r + j`, and re-indexed in forward.

    Viewing the normalised map as ``[B, r, (C/r) * H, W]`` (channel :math:`j`, row
    :math:`i H + h`), the features of raft :math:`i` are the fold of its rows :math:`iH .. iH+H-1`
    with region ``H``: the MLP is ``region_fold_linear`` + GELU + ``linear_region_unfold`` with
    the official ``nn.Linear`` weights as they are (feature :math:`jH + h` is the fold's channel
    :math:`c p + k`). The map must be ``spatial_dim`` long along ``axis``.

    Args:
        spatial_dim: H (``axis=2``) or W (``axis=3``).
        channels: C, a multiple of ``raft_size``.
        raft_size: r, channels per raft.
        expansion_factor: hidden width of the MLP over ``spatial_dim * raft_size`` features.
        dropout: after the GELU and after the MLP.
        drop_path_rate: stochastic depth of the residual branch.
        axis: keyword-only, 2 (vertical mixing) or 3 (horizontal mixing).
    """

    def __init__(self, spatial_dim: int, channels: int, raft_size: int, expansion_factor: int = 4,
                 dropout: float = 0.0, drop_path_rate: float = 0.0, *, axis: int = 2):
        super().__init__()
        if channels % raft_size:
            raise ValueError(f"PermutedBlock: channels ({channels}) must be a multiple of raft_size ({raft_size})")
        if axis not in (2, 3):
            raise ValueError(f"PermutedBlock: axis must be 2 or 3, got {axis}")
        self.spatial_dim, self.channels, self.raft_size, self.axis = spatial_dim, channels, raft_size, axis
        dim = spatial_dim * raft_size
        self.norm = nn.Sequential(nn.Identity(), nn.LayerNorm(channels), nn.Identity())
        self.drop = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.fn = nn.Sequential(nn.Linear(dim, dim * expansion_factor), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim * expansion_factor, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        r = self.raft_size
        ln = self.norm[1]
        # Official LayerNorm channel order (co chw) -> the map's (chw co).
        gamma = ln.weight.view(C // r, r).t().reshape(C)
        beta = ln.bias.view(C // r, r).t().reshape(C)
        y = F.layer_norm(x.permute(0, 2, 3, 1), [C], gamma, beta, ln.eps).permute(0, 3, 1, 2)
        y = y.reshape(B, r, (C // r) * H, W)   # raft i's rows are iH .. iH + H - 1
        fc1 = self.fn[0]
        fc2 = self.fn[3]
        L = y.shape[self.axis]
        hidden = region_fold_linear(y, self.axis, self.spatial_dim, fc1.weight, fc1.bias)
        hidden = self.fn[2](self.fn[1](hidden))
        out = linear_region_unfold(hidden, self.axis, self.spatial_dim, L, fc2.weight, fc2.bias)
        return self.drop(self.fn[4](out).reshape(B, C, H, W)) + x

    def extra_repr(self) -> str:
        return f"spatial_dim={self.spatial_dim}, channels={self.channels}, raft_size={self.raft_size}, axis={self.axis}"


class RaftTokenMixer(nn.Sequential):
    r"""RaftMLP's serial token mixer: vertical then horizontal :class:`PermutedBlock` on a
    ``[B, C, H, W]`` map.

    It stands for entries 0-3 of one depth of the official ``SerialPermutedLevel`` Sequential
    (``Rearrange``, ``PermutedBlock(H)``, ``Rearrange``, ``PermutedBlock(W)``), with the same
    indices: the rearrangements, free on a map, are ``nn.Identity`` placeholders, so the keys are
    the official ``1.norm.1.*``, ``1.fn.0.*``, ``1.fn.3.*``, ``3.*``. Input and output channel
    ``j * C / r + i`` is the official token feature ``(chw co)``.
    """

    def __init__(self, channels: int, h: int, w: int, raft_size: int, expansion_factor: int = 4,
                 dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(nn.Identity(),
                         PermutedBlock(h, channels, raft_size, expansion_factor, dropout, drop_path_rate, axis=2),
                         nn.Identity(),
                         PermutedBlock(w, channels, raft_size, expansion_factor, dropout, drop_path_rate, axis=3))
