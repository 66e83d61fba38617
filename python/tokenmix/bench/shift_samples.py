"""Samples of the shift family (``tokenmix.ops.shift``) for opcheck, torch.compile and
``python -m tokenmix check``: one ``<op>_samples(device, dtype)`` per op, arguments in the schema's
order (``shifts`` flattened to ``[dy_0, dx_0, ...]``, ``groups`` ``[]`` for equal groups).

``basic`` samples are small (B=2, 6-12 channels, 5x7 .. 9x8 maps) and cover both shift modes, the
AS-MLP chunk groups (a smaller last group), one group per channel (CycleFC) and a region that does
not divide its axis; ``kernel`` samples add a channels_last input and one larger shape (32
channels, 17x19) that spans several tiles of the kernels: projections to 80-160 channels, over
several 64-wide output tiles of the CUDA GEMM in both dimensions (partial last ones), and for
shift_linear two bands of rows per image on the CPU (about 48K floats / 160 channels = 307 of its
323 pixels per tile)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from tokenmix.samples import Draw, Sample

__all__ = ["shift_tokens_samples", "shift_linear_samples", "region_fold_samples", "region_unfold_samples",
           "region_fold_linear_samples", "linear_region_unfold_samples"]

CL = torch.channels_last


def _flat(pairs: Sequence[Tuple[int, int]]) -> List[int]:
    return [int(v) for p in pairs for v in p]


# (name, C, H, W, shifts, groups, mode) of the shift samples: AS-MLP's chunk of 10 channels into
# [4, 4, 2] with shifts -1..1 along one axis; CycleFC (one group per channel, offsets beyond the
# map included); equal groups with the circular mode.
_SHIFT_BASIC = [
    ("asmlp", 10, 5, 7, [(-1, 0), (0, 0), (1, 0)], [4, 4, 2], "zeros"),
    ("cyclefc", 6, 7, 6, [(-1, 0), (0, 1), (1, 0), (0, -1), (9, -2), (-3, 8)], [], "zeros"),
    ("circular", 12, 9, 8, [(2, -3), (-1, 0), (0, 11), (-10, 1)], [], "circular"),
]
# Larger: 32 channels over 17x19 (projected to 160), four equal groups, offsets inside and beyond
# the map.
_SHIFT_BIG = (32, 17, 19, [(1, -2), (-3, 0), (0, 20), (-18, 5)], [])


def _w(r: Draw, cout: int, k: int) -> Tensor:
    return r.randn(cout, k, scale=k ** -0.5)


def shift_tokens_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    out = [Sample(f"shift_tokens_{name}", "shift_tokens", (r.randn(2, C, H, W), _flat(s), list(g), mode))
           for name, C, H, W, s, g, mode in _SHIFT_BASIC]
    C, H, W, s, g = _SHIFT_BIG
    out.append(Sample("shift_tokens_channels_last", "shift_tokens",
                      (r.randn(2, 10, 6, 7).to(memory_format=CL), _flat(_SHIFT_BASIC[0][4]), [4, 4, 2], "circular"),
                      kind="kernel"))
    for mode in ("zeros", "circular"):
        out.append(Sample(f"shift_tokens_32ch_{mode}", "shift_tokens", (r.randn(2, C, H, W), _flat(s), list(g), mode),
                          kind="kernel"))
    return out


def shift_linear_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    out = []
    for i, (name, C, H, W, s, g, mode) in enumerate(_SHIFT_BASIC):
        cout = 8 + i
        w = _w(r, cout, C)
        if i == 1:  # the 1x1-conv weight layout, no bias
            out.append(Sample(f"shift_linear_{name}", "shift_linear",
                              (r.randn(2, C, H, W), _flat(s), w.reshape(cout, C, 1, 1), None, list(g), mode)))
        else:
            out.append(Sample(f"shift_linear_{name}", "shift_linear",
                              (r.randn(2, C, H, W), _flat(s), w, r.randn(cout, scale=0.1), list(g), mode)))
    out.append(Sample("shift_linear_channels_last", "shift_linear",
                      (r.randn(2, 10, 6, 7).to(memory_format=CL), _flat(_SHIFT_BASIC[0][4]), _w(r, 12, 10),
                       r.randn(12, scale=0.1), [4, 4, 2], "zeros"), kind="kernel"))
    C, H, W, s, g = _SHIFT_BIG
    for mode in ("zeros", "circular"):
        out.append(Sample(f"shift_linear_32ch_{mode}", "shift_linear",
                          (r.randn(2, C, H, W), _flat(s), _w(r, 160, C), r.randn(160, scale=0.1), list(g), mode),
                          kind="kernel"))
    return out


# (name, C, H, W, axis, region, shift) of the region samples: rows 9 with p=2 (not divisible) and a
# shift; columns 7 with p=3 (not divisible) and a negative shift; columns 8 with p=2 (divisible).
_REGION_BASIC = [
    ("rows_p2", 6, 9, 7, 2, 2, 1),
    ("cols_p3", 8, 6, 7, 3, 3, -2),
    ("cols_p2", 12, 5, 8, 3, 2, 0),
]
# Larger: 32 channels over 17x19, p=3 (not divisible on either axis).
_REGION_BIG = [("32ch_rows", 32, 17, 19, 2, 3, 1), ("32ch_cols", 32, 17, 19, 3, 3, -4)]


def _folded_shape(B: int, C: int, H: int, W: int, axis: int, p: int) -> Tuple[int, int, int, int]:
    L = H if axis == 2 else W
    A = -(-L // p)
    return (B, C * p, A, W) if axis == 2 else (B, C * p, H, A)


def region_fold_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    out = [Sample(f"region_fold_{name}", "region_fold", (r.randn(2, C, H, W), axis, p, shift))
           for name, C, H, W, axis, p, shift in _REGION_BASIC]
    out.append(Sample("region_fold_channels_last", "region_fold",
                      (r.randn(2, 6, 9, 7).to(memory_format=CL), 2, 2, 1), kind="kernel"))
    out += [Sample(f"region_fold_{name}", "region_fold", (r.randn(2, C, H, W), axis, p, shift), kind="kernel")
            for name, C, H, W, axis, p, shift in _REGION_BIG]
    return out


def region_unfold_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    out = []
    for kind, specs in (("basic", _REGION_BASIC), ("kernel", _REGION_BIG)):
        for name, C, H, W, axis, p, shift in specs:
            L = H if axis == 2 else W
            out.append(Sample(f"region_unfold_{name}", "region_unfold",
                              (r.randn(*_folded_shape(2, C, H, W, axis, p)), axis, p, L, shift), kind=kind))
    out.append(Sample("region_unfold_channels_last", "region_unfold",
                      (r.randn(*_folded_shape(2, 6, 9, 7, 2, 2)).to(memory_format=CL), 2, 2, 9, 1), kind="kernel"))
    return out


def region_fold_linear_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    out = []
    for i, (name, C, H, W, axis, p, shift) in enumerate(_REGION_BASIC):
        cout = 2 * C
        w = _w(r, cout, C * p)
        if i == 1:  # the 1x1-conv weight layout, no bias
            args = (r.randn(2, C, H, W), axis, p, w.reshape(cout, C * p, 1, 1), None, shift)
        else:
            args = (r.randn(2, C, H, W), axis, p, w, r.randn(cout, scale=0.1), shift)
        out.append(Sample(f"region_fold_linear_{name}", "region_fold_linear", args))
    out.append(Sample("region_fold_linear_channels_last", "region_fold_linear",
                      (r.randn(2, 6, 9, 7).to(memory_format=CL), 2, 2, _w(r, 10, 12), r.randn(10, scale=0.1), 1),
                      kind="kernel"))
    for name, C, H, W, axis, p, shift in _REGION_BIG:
        out.append(Sample(f"region_fold_linear_{name}", "region_fold_linear",
                          (r.randn(2, C, H, W), axis, p, _w(r, 80, C * p), r.randn(80, scale=0.1), shift),
                          kind="kernel"))
    return out


def linear_region_unfold_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    out = []
    for i, (name, C, H, W, axis, p, shift) in enumerate(_REGION_BASIC):
        L = H if axis == 2 else W
        cin = 2 * C
        _, _, A, D = _folded_shape(2, cin, H, W, axis, p)
        w = _w(r, C * p, cin)
        if i == 1:  # the 1x1-conv weight layout, no bias
            args = (r.randn(2, cin, A, D), axis, p, L, w.reshape(C * p, cin, 1, 1), None, shift)
        else:
            args = (r.randn(2, cin, A, D), axis, p, L, w, r.randn(C * p, scale=0.1), shift)
        out.append(Sample(f"linear_region_unfold_{name}", "linear_region_unfold", args))
    # channels_last: 10 channels folded with p=2 along 9 rows (5 folded rows) of width 7
    out.append(Sample("linear_region_unfold_channels_last", "linear_region_unfold",
                      (r.randn(2, 10, 5, 7).to(memory_format=CL), 2, 2, 9, _w(r, 12, 10), r.randn(12, scale=0.1), 1),
                      kind="kernel"))
    for name, C, H, W, axis, p, shift in _REGION_BIG:
        L = H if axis == 2 else W
        _, _, A, D = _folded_shape(2, 80, H, W, axis, p)
        out.append(Sample(f"linear_region_unfold_{name}", "linear_region_unfold",
                          (r.randn(2, 80, A, D), axis, p, L, _w(r, C * p, 80), r.randn(C * p, scale=0.1), shift),
                          kind="kernel"))
    return out
