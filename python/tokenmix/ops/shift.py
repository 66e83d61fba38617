r"""Shifted and rearranged token mixing (AS-MLP, S²-MLP, CycleMLP, Hire-MLP, RaftMLP): channel-group
shifts and inner-region folds, alone and fused with the 1×1 projection next to them, as ops with
backward passes on CPU and CUDA.

The shift and the fold are data movement; on their own they cost one pass over memory. Fused with
the projection they cost nothing: the fused ops read each operand element through the shift or
fold index map while loading the GEMM's operand, so the shifted or folded tensor never exists.

Every op takes ``[B, C, H, W]`` maps in either memory format (NCHW or channels_last) and returns
its result in the input's memory format.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from tokenmix.errors import call_op

__all__ = ["shift_tokens", "shift_linear", "region_fold", "region_unfold", "region_fold_linear",
           "linear_region_unfold"]

_ops = torch.ops.tokenmix


def _flat_shifts(shifts: List[Tuple[int, int]]) -> List[int]:
    """G ``(dy, dx)`` pairs -> ``[dy_0, dx_0, dy_1, dx_1, ...]`` (the schema's ``int[] shifts``).
    Eager mode also takes that flat list itself, as the registry's samples pass it."""
    flat: List[int] = []
    for s in shifts:
        if isinstance(s, int):
            flat.append(s)
        else:
            flat.append(int(s[0]))
            flat.append(int(s[1]))
    return flat


def _groups(groups: Optional[List[int]]) -> List[int]:
    """``None`` -> ``[]``, which the op reads as G equal groups."""
    if groups is None:
        return []
    return [int(g) for g in groups]


def shift_tokens(x: Tensor, shifts: List[Tuple[int, int]], groups: Optional[List[int]] = None,
                 mode: str = "zeros") -> Tensor:
    r"""Shift each channel group of a map by its own integer offset.

    With channel ``c`` in group ``g`` and that group's shift ``(dy_g, dx_g)``:

    .. math::
        \mathrm{out}[b, c, h, w] = x[b, c, h - dy_g, w - dx_g]

    (``torch.roll``'s sign). ``mode="zeros"`` reads 0 where ``(h - dy_g, w - dx_g)`` lies outside
    the map (AS-MLP, S²-MLP, ShiftViT); ``mode="circular"`` wraps around (Swin's cyclic shift,
    Hire-MLP's cross-region shift). Shifts may be negative, zero or larger than the map.

    Args:
        x: ``[B, C, H, W]``, NCHW or channels_last (the output keeps it).
        shifts: G pairs ``(dy, dx)`` (or the flat list ``[dy_0, dx_0, ...]`` the schema takes).
        groups: ``None`` splits C into G equal consecutive groups (``C % G == 0``), or G channel
            counts summing to C (AS-MLP's ``torch.chunk`` gives a smaller last group).
        mode: ``"zeros"`` or ``"circular"``.

    Returns:
        ``[B, C, H, W]``. Gradient to ``x``: the same shift with every offset negated.
    """
    flat, grp = _flat_shifts(shifts), _groups(groups)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.shift_tokens(x, flat, grp, mode)
    return call_op(_ops.shift_tokens, x, flat, grp, mode)


def shift_linear(x: Tensor, shifts: List[Tuple[int, int]], weight: Tensor, bias: Optional[Tensor] = None,
                 groups: Optional[List[int]] = None, mode: str = "zeros") -> Tensor:
    r"""A 1×1 convolution of the channel-group-shifted map, without the shifted map:

    .. math::
        \mathrm{out}[b, o, h, w] = \mathrm{bias}_o + \sum_c W_{o c}\,
            \mathrm{shift\_tokens}(x)[b, c, h, w]

    i.e. ``F.conv2d(shift_tokens(x, shifts, groups, mode), weight.view(Cout, C, 1, 1), bias)``.
    The shift is index math in the load of the GEMM's operand. CycleMLP's ``CycleFC`` is this with
    one group per channel and shifts equal to minus its fixed offsets; AS-MLP's shift + 1×1 with
    ``shift_size`` groups shifted by ``-(shift_size // 2) .. shift_size // 2`` along one axis.

    Args:
        x: ``[B, C, H, W]``, NCHW or channels_last.
        shifts, groups, mode: as in :func:`shift_tokens`.
        weight: ``[Cout, C]`` or ``[Cout, C, 1, 1]``, x's dtype.
        bias: ``[Cout]`` or ``None``.

    Returns:
        ``[B, Cout, H, W]`` in x's memory format. Gradients to ``x``, ``weight`` and ``bias``.
    """
    flat, grp = _flat_shifts(shifts), _groups(groups)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.shift_linear(x, flat, weight, bias, grp, mode)
    return call_op(_ops.shift_linear, x, flat, weight, bias, grp, mode)


def region_fold(x: Tensor, axis: int, region: int, shift: int = 0) -> Tensor:
    r"""Hire-MLP's inner-region rearrangement: fold ``p = region`` consecutive rows (``axis=2``) or
    columns (``axis=3``) into channels.

    With ``L`` the length of the axis and ``Lp = ceil(L / p) * p``: ``t = roll(x, shift, axis)``,
    then circular padding at the end of the axis (``t = cat([t, t.narrow(axis, 0, Lp - L)])``),
    then, with channel index ``c * p + k``,

    .. math::
        \text{axis 2: } \mathrm{out}[b, cp + k, g, w] = t[b, c, gp + k, w] \qquad
        \text{axis 3: } \mathrm{out}[b, cp + k, h, g] = t[b, c, h, gp + k]

    Args:
        x: ``[B, C, H, W]``, NCHW or channels_last.
        axis: 2 (rows) or 3 (columns).
        region: ``p``, ``1 <= p <= L``.
        shift: the cyclic shift applied first (Hire-MLP's cross-region step), any integer.

    Returns:
        ``[B, C*p, Lp/p, W]`` (axis 2) or ``[B, C*p, H, Lp/p]`` (axis 3). Gradient to ``x``: the
        adjoint, in which the gradients of the padded copies add into their source positions.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.region_fold(x, axis, region, shift)
    return call_op(_ops.region_fold, x, axis, region, shift)


def region_unfold(y: Tensor, axis: int, region: int, size: int, shift: int = 0) -> Tensor:
    r"""The inverse of :func:`region_fold`: unfold the channels ``c * p + k`` back into ``p``
    positions along ``axis``, crop to ``size`` (= L) and roll by ``-shift``:

    .. math::
        \text{axis 2: } \mathrm{out}[b, c, i, w] = y[b, cp + k, g, w]
        \quad\text{with } gp + k = (i + \mathrm{shift}) \bmod L

    Args:
        y: ``[B, C*p, Lp/p, W]`` (axis 2) or ``[B, C*p, H, Lp/p]`` (axis 3).
        axis, region, shift: as given to :func:`region_fold`.
        size: ``L``, the length of the unfolded axis, ``Lp - p < L <= Lp``.

    Returns:
        ``[B, C, L, W]`` or ``[B, C, H, L]`` in y's memory format. Gradient to ``y``: the fold with
        zeros where the crop dropped positions.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.region_unfold(y, axis, region, size, shift)
    return call_op(_ops.region_unfold, y, axis, region, size, shift)


def region_fold_linear(x: Tensor, axis: int, region: int, weight: Tensor, bias: Optional[Tensor] = None,
                       shift: int = 0) -> Tensor:
    r"""Fold, then a 1×1 projection, without the folded map (Hire-MLP's ``mlp_h1`` / ``mlp_w1``):

    .. math::
        \mathrm{out}[b, o, \cdot] = \mathrm{bias}_o + \sum_{j < C p} W_{o j}\,
            \mathrm{region\_fold}(x, axis, p, shift)[b, j, \cdot]

    i.e. ``F.conv2d(region_fold(x, axis, region, shift), weight.view(Cout, C * p, 1, 1), bias)``.

    Args:
        x: ``[B, C, H, W]``, NCHW or channels_last.
        axis, region, shift: as in :func:`region_fold`.
        weight: ``[Cout, C*p]`` or ``[Cout, C*p, 1, 1]``.
        bias: ``[Cout]`` or ``None``.

    Returns:
        ``[B, Cout, Lp/p, W]`` (axis 2) or ``[B, Cout, H, Lp/p]`` (axis 3), in x's memory format.
        Gradients to ``x``, ``weight`` and ``bias``.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.region_fold_linear(x, axis, region, weight, bias, shift)
    return call_op(_ops.region_fold_linear, x, axis, region, weight, bias, shift)


def linear_region_unfold(y: Tensor, axis: int, region: int, size: int, weight: Tensor,
                         bias: Optional[Tensor] = None, shift: int = 0) -> Tensor:
    r"""A 1×1 projection to ``C * p`` channels, then the unfold, without the projected folded map
    (Hire-MLP's ``mlp_h2`` / ``mlp_w2`` and the rearrangement back):

    .. math::
        \mathrm{out} = \mathrm{region\_unfold}\bigl(\mathrm{bias} + W\,y,\ axis, p, size, shift\bigr)

    i.e. ``region_unfold(F.conv2d(y, weight.view(C * p, Cin, 1, 1), bias), axis, region, size,
    shift)``; projected positions that the crop drops are never computed.

    Args:
        y: ``[B, Cin, Lp/p, W]`` (axis 2) or ``[B, Cin, H, Lp/p]`` (axis 3), NCHW or channels_last.
        axis, region, size, shift: as in :func:`region_unfold`.
        weight: ``[C*p, Cin]`` or ``[C*p, Cin, 1, 1]``.
        bias: ``[C*p]`` or ``None``.

    Returns:
        ``[B, C, L, W]`` or ``[B, C, H, L]`` in y's memory format. Gradients to ``y``, ``weight``
        and ``bias``.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.linear_region_unfold(y, axis, region, size, weight, bias, shift)
    return call_op(_ops.linear_region_unfold, y, axis, region, size, weight, bias, shift)


# ---- fake (meta) kernels, for torch.compile / torch.export --------------------------------------
# Shapes and memory formats only; the real kernels' checks run when the op runs.


def _like(x: Tensor, shape: List[int]) -> Tensor:
    """An empty tensor of ``shape`` in x's suggested memory format (what the kernels return)."""
    from torch._prims_common import suggest_memory_format
    return x.new_empty(shape).contiguous(memory_format=suggest_memory_format(x))


def _folded(n: int, p: int) -> int:
    return (n + p - 1) // p


def _fold_shape(x: Tensor, channels: int, axis: int, region: int) -> List[int]:
    B, _, H, W = x.shape
    if axis == 2:
        return [B, channels, _folded(H, region), W]
    return [B, channels, H, _folded(W, region)]


def _unfold_shape(y: Tensor, channels: int, axis: int, size: int) -> List[int]:
    B, _, H, W = y.shape
    return [B, channels, size, W] if axis == 2 else [B, channels, H, size]


@torch.library.register_fake("tokenmix::shift_tokens")
def _(x, shifts, groups, mode):
    return _like(x, list(x.shape))


@torch.library.register_fake("tokenmix::shift_linear")
def _(x, shifts, weight, bias, groups, mode):
    B, _, H, W = x.shape
    return _like(x, [B, weight.shape[0], H, W])


@torch.library.register_fake("tokenmix::shift_linear_backward")
def _(grad, x, shifts, weight, groups, mode):
    return _like(x, list(x.shape)), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@torch.library.register_fake("tokenmix::region_fold")
def _(x, axis, region, shift):
    return _like(x, _fold_shape(x, x.shape[1] * region, axis, region))


@torch.library.register_fake("tokenmix::region_fold_backward")
def _(grad, axis, region, size, shift):
    return _like(grad, _unfold_shape(grad, grad.shape[1] // region, axis, size))


@torch.library.register_fake("tokenmix::region_unfold")
def _(y, axis, region, size, shift):
    return _like(y, _unfold_shape(y, y.shape[1] // region, axis, size))


@torch.library.register_fake("tokenmix::region_unfold_backward")
def _(grad, axis, region, shift):
    return _like(grad, _fold_shape(grad, grad.shape[1] * region, axis, region))


@torch.library.register_fake("tokenmix::region_fold_linear")
def _(x, axis, region, weight, bias, shift):
    return _like(x, _fold_shape(x, weight.shape[0], axis, region))


@torch.library.register_fake("tokenmix::region_fold_linear_backward")
def _(grad, x, axis, region, weight, shift):
    return _like(x, list(x.shape)), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@torch.library.register_fake("tokenmix::linear_region_unfold")
def _(y, axis, region, size, weight, bias, shift):
    return _like(y, _unfold_shape(y, weight.shape[0] // region, axis, size))


@torch.library.register_fake("tokenmix::linear_region_unfold_backward")
def _(grad, y, axis, region, weight, shift):
    return _like(y, list(y.shape)), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))
