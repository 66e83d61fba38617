"""Deformable-convolution modules: a DCN layer with its own offset branch (mmcv's
DeformConv2dPack layout) and LIT's deformable token merging, state_dict-compatible with LIT."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tokenmix.ops.deform_conv2d import deform_conv2d

__all__ = ["DeformConv2dPack", "DeformablePatchMerging"]


class DeformConv2dPack(nn.Module):
    """Deformable convolution whose offsets come from a zero-initialised Conv2d on the same input
    (so it starts as a plain convolution). Keys: ``weight``, ``bias``, ``conv_offset.{weight,bias}``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, bias: bool = True):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size,
                                     stride=stride, padding=padding, dilation=dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        return deform_conv2d(x, self.conv_offset(x), self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation)


class DeformablePatchMerging(nn.Module):
    r"""LIT's deformable token merging between stages.

    ``off = conv_offset(x)`` (kernel = stride = k, zero-initialised),
    ``y = GELU(BatchNorm2d(deform_conv2d(x, off, W, b, stride=k)))``, returned as tokens
    ``[B, (H / k) * (W / k), out_chans]``. Input ``[B, in_chans, H, W]``. Keys as LIT:
    ``dconv.weight``, ``dconv.bias``, ``dconv.conv_offset.{weight,bias}``, ``norm_layer.*``.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.dconv = DeformConv2dPack(in_chans, out_chans, kernel_size, stride=kernel_size)
        self.norm_layer = nn.BatchNorm2d(out_chans)
        self.act_layer = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act_layer(self.norm_layer(self.dconv(x)))
        return y.flatten(2).transpose(1, 2)
