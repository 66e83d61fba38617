"""Benchmark cases of the shifted / rearranged token-mixing family at the backbones' shapes: each
fused op vs the official eager formulation (rolls, pads, chunks, reshapes and permutes around a
1x1 conv), torch.compile of it, and, for the projections, the plain 1x1 conv of the same size as
the floor. The module and model cases (CycleFC, Hire-MLP's token mixer, AS-MLP's axial shift,
hire_mlp_tiny) are in :mod:`tokenmix.bench.shift_modules`."""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import Tensor

import tokenmix.ops as tm
from tokenmix.bench.harness import Case
from tokenmix.bench.shift_modules import module_cases


def _asmlp_shift(x: Tensor, shift_size: int, dim: int) -> Tensor:
    """AS-MLP's shift along `dim` as the official code writes it: zero-pad the map, split the
    channels with torch.chunk, roll chunk i by i - shift_size // 2, concatenate, crop."""
    H, W = x.shape[-2:]
    pad = shift_size // 2
    t = F.pad(x, (pad, pad, pad, pad))
    parts = [torch.roll(c, s, dim) for c, s in zip(torch.chunk(t, shift_size, 1), range(-pad, pad + 1))]
    return torch.cat(parts, 1).narrow(2, pad, H).narrow(3, pad, W)


def _asmlp_groups(C: int, shift_size: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The chunk sizes and the (dy, dx) = (0, s) shifts of AS-MLP's left-right shift."""
    sizes = [c.shape[0] for c in torch.empty(C).chunk(shift_size)]
    pad = shift_size // 2
    return sizes, [(0, s) for s in range(-pad, -pad + len(sizes))]


def _hire_fold(x: Tensor, pixel: int, step: int) -> Tensor:
    """Hire-MLP's official H-branch rearrangement: roll by the step, circular pad, fold rows."""
    B, C, H, W = x.shape
    pad = (pixel - H % pixel) % pixel
    h = torch.roll(x, step, -2)
    h = F.pad(h, (0, 0, 0, pad), mode="circular")
    return h.reshape(B, C, (H + pad) // pixel, pixel, W).permute(0, 1, 3, 2, 4).reshape(
        B, C * pixel, (H + pad) // pixel, W)


def _hire_unfold(h: Tensor, pixel: int, step: int, H: int) -> Tensor:
    B, Cp, G, W = h.shape
    C = Cp // pixel
    h = h.reshape(B, C, pixel, G, W).permute(0, 1, 3, 2, 4).reshape(B, C, G * pixel, W)
    return torch.roll(h.narrow(2, 0, H), -step, -2)


def _maker(shapes: List[tuple], batch: int, grads: List[int]) -> Callable:
    """make(device, dtype) drawing one tensor per (shape, scale) entry, leading dim batch when the
    shape starts with None; `grads` lists the indices that need gradients."""
    def make(device, dtype):
        gen = torch.Generator().manual_seed(0)
        ts = []
        for shape, scale in shapes:
            full = tuple(batch if d is None else d for d in shape)
            ts.append((scale * torch.randn(*full, generator=gen)).to(device, dtype))
        return ts, [ts[i] for i in grads]
    return make


def cases(batch: int, device_type: str = "cpu") -> list[Case]:
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    out = []

    C, hw, ss = 96, 56, 5
    sizes, shifts = _asmlp_groups(C, ss)
    n = batch * C * hw * hw
    make = _maker([((None, C, hw, hw), 1.0), ((C, C, 1, 1), C ** -0.5), ((C,), 0.1)], batch, [0, 1, 2])
    out.append(Case(
        "shift_linear", f"AS-MLP stage 1 shift+1x1 B={batch} {C}ch {hw}x{hw} shift{ss}", make,
        lambda x, w, b: tm.shift_linear(x, shifts, w, b, groups=sizes),
        lambda x, w, b: F.conv2d(_asmlp_shift(x, ss, 3), w, b),
        floor=lambda x, w, b: F.conv2d(x, w, b), flops_fwd=2 * n * C, flops_bwd=4 * n * C))
    make_x = _maker([((None, C, hw, hw), 1.0)], batch, [0])
    out.append(Case(
        "shift_tokens", f"AS-MLP stage 1 shift B={batch} {C}ch {hw}x{hw} shift{ss}", make_x,
        lambda x: tm.shift_tokens(x, shifts, groups=sizes),
        lambda x: _asmlp_shift(x, ss, 3),
        bytes_fwd=lambda dt: 2 * n * size(dt), bytes_bwd=lambda dt: 2 * n * size(dt)))

    # Hire-MLP's H branch: fold + mlp_h1 (C*p -> C/2), BN + ReLU left out, mlp_h2 (C/2 -> C*p) +
    # unfold; stage 1 (64 ch, 56 rows, pixel 4, step 2) and stage 2 (128 ch, 28 rows, pixel 3:
    # not a multiple, circular padding).
    for name, (C, hw, p, step) in {"stage 1": (64, 56, 4, 2), "stage 2": (128, 28, 3, 2)}.items():
        G = -(-hw // p)
        make = _maker([((None, C, hw, hw), 1.0), ((C // 2, C * p, 1, 1), (C * p) ** -0.5),
                       ((C * p, C // 2, 1, 1), (C // 2) ** -0.5), ((C * p,), 0.1)], batch, [0, 1, 2, 3])

        def fused(x, w1, w2, b2, p=p, step=step, hw=hw):
            h = tm.region_fold_linear(x, 2, p, w1, None, step)
            return tm.linear_region_unfold(h, 2, p, hw, w2, b2, step)

        def eager(x, w1, w2, b2, p=p, step=step, hw=hw):
            h = F.conv2d(_hire_fold(x, p, step), w1)
            return _hire_unfold(F.conv2d(h, w2, b2), p, step, hw)

        def floor(x, w1, w2, b2, G=G, C=C, p=p, hw=hw):
            y = x.new_empty(x.shape[0], C * p, G, hw)
            return F.conv2d(F.conv2d(y, w1), w2, b2)

        out.append(Case(
            "region_fold_linear", f"Hire-MLP {name} H branch B={batch} {C}ch {hw}x{hw} pixel{p} step{step}",
            make, fused, eager, floor=floor, floor_backward=False,
            flops_fwd=2 * 2 * batch * G * hw * C * p * (C // 2),
            flops_bwd=4 * 2 * batch * G * hw * C * p * (C // 2)))

        nx = batch * C * hw * hw
        make_x = _maker([((None, C, hw, hw), 1.0)], batch, [0])
        out.append(Case(
            "region_fold", f"Hire-MLP {name} fold B={batch} {C}ch {hw}x{hw} pixel{p} step{step}", make_x,
            lambda x, p=p, step=step: tm.region_fold(x, 2, p, step),
            lambda x, p=p, step=step: _hire_fold(x, p, step),
            bytes_fwd=lambda dt, nx=nx, G=G, p=p, hw=hw: (nx + nx // hw * G * p) * size(dt),
            bytes_bwd=lambda dt, nx=nx, G=G, p=p, hw=hw: (nx + nx // hw * G * p) * size(dt)))

    return out + module_cases(batch)
