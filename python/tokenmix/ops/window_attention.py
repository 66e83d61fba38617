"""Windowed attention (Swin W-MSA / SW-MSA, GC ViT global query, HAT-Net local windows) as one
fused op with a backward pass on CPU and CUDA."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tokenmix.errors import call_op
from tokenmix.ops._args import IntPair, pair

__all__ = ["window_attention"]


def window_attention(q: Tensor, k: Tensor, v: Tensor, window_size: IntPair, shift_size: IntPair = 0,
                     bias_table: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    r"""Multi-head attention inside non-overlapping (optionally shifted) windows.

    For every window :math:`\mathcal{W}` (``wh x ww`` tokens), head and query token :math:`i`:

    .. math::
        \mathrm{out}_i = \sum_{j \in \mathcal{W}} \mathrm{softmax}_j\bigl(
            s\, q_i \cdot k_j + B[\mathrm{rel}(i, j)] + M_{ij}\bigr)\, v_j

    with :math:`s` = ``scale`` (default ``head_dim ** -0.5``), :math:`B` = ``bias_table`` indexed by
    Swin's relative position index ``(dy + wh - 1) * (2 ww - 1) + (dx + ww - 1)``, and
    :math:`M_{ij} = -\infty` where keys are excluded (Swin's shifted-window regions, keys outside
    the map). Roll, pad, partition and reverse happen as index math inside the kernel.

    Args:
        q: ``[B, H, W, heads, d]``, or ``[B, wh, ww, heads, d]``: one window of global queries per
            image shared by all its windows (GC ViT); its gradient sums over them.
        k, v: ``[B, H, W, heads, d]``. Any strides with a unit last stride are read without a
            copy, e.g. ``qkv.view(B, H, W, 3, heads, d).unbind(3)``.
        window_size: ``wh`` or ``(wh, ww)``, at most the map size.
        shift_size: ``s`` or ``(sh, sw)``, each in ``[0, window)``: Swin's cyclic shift by
            ``(-sh, -sw)`` with its region mask, and the reverse shift. Needs ``H % wh == 0`` and
            ``W % ww == 0``. Without shift, windows at the bottom/right border may be partial:
            keys outside the map do not exist for them.
        bias_table: ``[(2wh - 1) * (2ww - 1), heads]``, receives a gradient.
        scale: multiplies ``q . k`` (default ``d ** -0.5``).

    Returns:
        ``[B, H, W, heads, d]``, contiguous (``.view(B, H, W, heads * d)`` is free).
    """
    window = pair(window_size)
    shift = pair(shift_size)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return torch.ops.tokenmix.window_attention(q, k, v, window, shift, bias_table, scale)
    return call_op(torch.ops.tokenmix.window_attention, q, k, v, window, shift, bias_table, scale)


@torch.library.register_fake("tokenmix::window_attention")
def _(q, k, v, window_size, shift_size=(0, 0), bias_table=None, scale=None):
    return k.new_empty(k.shape)


# window_attention_fwd has a C++ Meta kernel instead: the log-sum-exp's shape is defined once,
# beside the kernels that write it.


@torch.library.register_fake("tokenmix::window_attention_backward")
def _(grad, q, k, v, lse, window_size, shift_size, bias_table, scale):
    dbias = bias_table.new_empty(bias_table.shape) if bias_table is not None else k.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias
