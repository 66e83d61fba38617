"""HorNet's recursive gated convolution (gnConv) as one fused op: the depthwise conv, scale,
split and first gate in one pass, each pws step a GEMM gated in cache, a backward that saves only
the operands."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from tokenmix.errors import call_op

__all__ = ["gnconv", "gate_dims"]


def gate_dims(dim: int, order: int) -> List[int]:
    """Channel widths of gnconv's gating steps, narrowest first: ``d_i = dim / 2**(order-1-i)``
    (``pw_weights[i]`` maps ``d_i`` to ``d_{i+1}`` channels, the depthwise conv has ``sum(d_i)``)."""
    return [dim >> (order - 1 - i) for i in range(order)]


def gnconv(x: Tensor, proj_in_weight: Tensor, proj_in_bias: Tensor, dw_weight: Tensor,
           dw_bias: Tensor, pw_weights: List[Tensor], pw_biases: List[Tensor],
           proj_out_weight: Tensor, proj_out_bias: Tensor, *, order: int, scale: float) -> Tensor:
    r"""Recursive gated convolution of order :math:`n` (HorNet's ``gnconv``).

    With :math:`d_i = \mathrm{dim} / 2^{n-1-i}` and :math:`S = \sum_i d_i`:

    .. math::
        [p_0, q] &= W_\mathrm{in} x + b_\mathrm{in}, \quad p_0 \in \mathbb{R}^{d_0},\;
            q \in \mathbb{R}^{S} \\
        [g_0, \dots, g_{n-1}] &= s \,(\mathrm{DWConv}_{k\times k}(q) + b_\mathrm{dw}) \\
        y_0 &= p_0 \odot g_0, \qquad y_{i} = (W_i y_{i-1} + b_i) \odot g_i \quad (i = 1..n-1) \\
        \mathrm{out} &= W_\mathrm{out} y_{n-1} + b_\mathrm{out}

    (every :math:`W` a 1x1 convolution, the depthwise conv padded to keep the map size).

    Args:
        x: ``[B, dim, H, W]``, NCHW or channels_last (the output keeps x's memory format);
            ``dim`` a multiple of ``2**(order-1)``.
        proj_in_weight, proj_in_bias: ``[2 dim, dim, 1, 1]``, ``[2 dim]``.
        dw_weight, dw_bias: ``[S, 1, k, k]`` (odd k), ``[S]``.
        pw_weights, pw_biases: ``order - 1`` tensors, ``[d_{i+1}, d_i, 1, 1]`` and ``[d_{i+1}]``
            (lists; eager mode also takes any sequence).
        proj_out_weight, proj_out_bias: ``[dim, dim, 1, 1]``, ``[dim]``.
        order: the number of gating steps :math:`n` (1 to 8).
        scale: :math:`s`, HorNet's ``s`` (1/3 in its models).

    Returns:
        ``[B, dim, H, W]``, with gradients to x and every weight and bias.
    """
    pw_w, pw_b, n, s = list(pw_weights), list(pw_biases), int(order), float(scale)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return torch.ops.tokenmix.gnconv(x, proj_in_weight, proj_in_bias, dw_weight, dw_bias, pw_w,
                                         pw_b, proj_out_weight, proj_out_bias, order=n, scale=s)
    return call_op(torch.ops.tokenmix.gnconv, x, proj_in_weight, proj_in_bias, dw_weight, dw_bias,
                   pw_w, pw_b, proj_out_weight, proj_out_bias, order=n, scale=s)


def _like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _like_x(x: Tensor) -> Tensor:
    # The kernels work in (and return) x's suggested memory format, NCHW or channels_last.
    from torch._prims_common import suggest_memory_format
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


@torch.library.register_fake("tokenmix::gnconv")
def _(x, proj_in_weight, proj_in_bias, dw_weight, dw_bias, pw_weights, pw_biases, proj_out_weight,
      proj_out_bias, *, order, scale):
    torch._check_value(x.dim() == 4, lambda: f"tokenmix.gnconv: x must have shape [B, dim, H, W], got {tuple(x.shape)}")
    return _like_x(x)


@torch.library.register_fake("tokenmix::gnconv_backward")
def _(grad, x, proj_in_weight, proj_in_bias, dw_weight, dw_bias, pw_weights, pw_biases,
      proj_out_weight, proj_out_bias, *, order, scale):
    return (_like_x(x),
            _like(proj_in_weight), _like(proj_in_bias), _like(dw_weight), _like(dw_bias),
            [_like(w) for w in pw_weights], [_like(b) for b in pw_biases],
            _like(proj_out_weight), _like(proj_out_bias))
