"""Eager oracles of the shifted / rearranged token-mixing ops, written the way the official code
computes them: rolls, pads, ``cat``, ``reshape`` + ``permute`` and ``F.conv2d``, every step a tensor
of its own. Each takes the op's arguments in the schema's order (``shifts`` flattened to
``[dy_0, dx_0, dy_1, dx_1, ...]``, ``groups`` ``[]`` for equal groups)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["shift_tokens", "shift_linear", "region_fold", "region_unfold", "region_fold_linear",
           "linear_region_unfold"]


def _group_sizes(C: int, G: int, groups: Sequence[int]) -> List[int]:
    return [int(g) for g in groups] if len(groups) else [C // G] * G


def _shift_one(x: Tensor, dy: int, dx: int, mode: str) -> Tensor:
    """One channel group shifted: a roll for "circular"; for "zeros", a pad on one side and a crop
    on the other (F.pad with a negative amount), offsets clamped to the map's size."""
    H, W = x.shape[-2:]
    if mode == "circular":
        return torch.roll(x, (dy, dx), (-2, -1))
    dy, dx = max(-H, min(H, dy)), max(-W, min(W, dx))
    return F.pad(x, (dx, -dx, dy, -dy))


def shift_tokens(x: Tensor, shifts: Sequence[int], groups: Sequence[int] = (), mode: str = "zeros") -> Tensor:
    G = len(shifts) // 2
    parts = torch.split(x, _group_sizes(x.shape[1], G, groups), dim=1)
    out = torch.cat([_shift_one(p, shifts[2 * g], shifts[2 * g + 1], mode) for g, p in enumerate(parts)], 1)
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out.contiguous()


def _is_channels_last(x: Tensor) -> bool:
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(x) == torch.channels_last


def _conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)


def shift_linear(x: Tensor, shifts: Sequence[int], weight: Tensor, bias: Optional[Tensor] = None,
                 groups: Sequence[int] = (), mode: str = "zeros") -> Tensor:
    return _conv1x1(shift_tokens(x, shifts, groups, mode), weight, bias)


def region_fold(x: Tensor, axis: int, region: int, shift: int = 0) -> Tensor:
    B, C, H, W = x.shape
    L, p = x.shape[axis], region
    Lp = -(-L // p) * p
    t = torch.roll(x, shift, axis) if shift else x
    if Lp > L:
        t = torch.cat([t, t.narrow(axis, 0, Lp - L)], axis)
    if axis == 2:
        return t.reshape(B, C, Lp // p, p, W).permute(0, 1, 3, 2, 4).reshape(B, C * p, Lp // p, W)
    return t.reshape(B, C, H, Lp // p, p).permute(0, 1, 4, 2, 3).reshape(B, C * p, H, Lp // p)


def region_unfold(y: Tensor, axis: int, region: int, size: int, shift: int = 0) -> Tensor:
    B, Cp, A, D = y.shape
    p = region
    C = Cp // p
    if axis == 2:
        t = y.reshape(B, C, p, A, D).permute(0, 1, 3, 2, 4).reshape(B, C, A * p, D)
    else:
        t = y.reshape(B, C, p, A, D).permute(0, 1, 3, 4, 2).reshape(B, C, A, D * p)
    t = t.narrow(axis, 0, size)
    return torch.roll(t, -shift, axis) if shift else t


def region_fold_linear(x: Tensor, axis: int, region: int, weight: Tensor, bias: Optional[Tensor] = None,
                       shift: int = 0) -> Tensor:
    return _conv1x1(region_fold(x, axis, region, shift), weight, bias)


def linear_region_unfold(y: Tensor, axis: int, region: int, size: int, weight: Tensor,
                         bias: Optional[Tensor] = None, shift: int = 0) -> Tensor:
    return region_unfold(_conv1x1(y, weight, bias), axis, region, size, shift)
