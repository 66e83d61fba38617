"""Deformable convolution (DCNv1/v2) with torchvision's signature and semantics, plus bf16, as a
fused op: bilinear sampling feeds the channel-mixing GEMM tile by tile."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tokenmix.errors import call_op
from tokenmix.ops._args import IntPair, pair

__all__ = ["deform_conv2d"]


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                  mask: Optional[Tensor] = None) -> Tensor:
    r"""Deformable 2-D convolution, a drop-in for ``torchvision.ops.deform_conv2d``.

    .. math::
        \mathrm{out}[b, o, p] = \mathrm{bias}[o] + \sum_{c, t} W[o, c, t]\; m[b, g(c), t, p]\;
            \mathrm{bilinear}\bigl(x[b, c],\; p_0 + p_t + \Delta[b, g(c), t, p]\bigr)

    where :math:`p_0` is output pixel :math:`p`'s window origin (stride, padding), :math:`p_t` tap
    :math:`t`'s dilated kernel position, :math:`\Delta` the learned (y, x) offset of offset group
    :math:`g(c)`, :math:`m` the DCNv2 modulation (1 without ``mask``); bilinear sampling reads
    zeros outside the map.

    Args:
        input: ``[B, C_in, H, W]``.
        offset: ``[B, 2 * offset_groups * kh * kw, H_out, W_out]``, (y, x) pairs per tap.
        weight: ``[C_out, C_in / groups, kh, kw]``.
        bias: ``[C_out]`` or ``None``.
        stride, padding, dilation: int or (h, w).
        mask: ``[B, offset_groups * kh * kw, H_out, W_out]`` or ``None``.

    Returns:
        ``[B, C_out, H_out, W_out]``. Gradients to input, offset, weight, bias and mask; the CPU
        backward is deterministic.
    """
    s, p, d = pair(stride), pair(padding), pair(dilation)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return torch.ops.tokenmix.deform_conv2d(input, offset, weight, bias, s, p, d, mask)
    return call_op(torch.ops.tokenmix.deform_conv2d, input, offset, weight, bias, s, p, d, mask)


@torch.library.register_fake("tokenmix::deform_conv2d")
def _(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
    torch._check_value(offset.device == input.device,
                       lambda: f"tokenmix.deform_conv2d: offset must be on the device of input ({input.device}), "
                               f"got {offset.device}")
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.register_fake("tokenmix::deform_conv2d_backward")
def _(grad, input, offset, weight, mask, stride, padding, dilation, bias):
    gb = weight.new_empty((weight.shape[0],) if bias else (0,))
    gm = mask.new_empty(mask.shape) if mask is not None else input.new_empty((0,))
    return input.new_empty(input.shape), offset.new_empty(offset.shape), weight.new_empty(weight.shape), gb, gm
