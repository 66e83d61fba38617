"""Benchmark cases of HorNet's recursive gated convolution at HorNet-T shapes: the fused op vs
HorNet's eager gnconv (1x1 convs, depthwise conv, split, gating products), torch.compile of it,
and the compute floor: the block's 1x1 projections alone as plain matmuls on token matrices."""
from __future__ import annotations

import torch

import tokenmix.ops as tm
from tokenmix.bench.harness import Case
from tokenmix.reference.gnconv import gate_dims
from tokenmix.reference.gnconv import gnconv as oracle

SCALE = 1.0 / 3


def cases(batch: int) -> list[Case]:
    out = []
    for name, (dim, order, hw) in {"HorNet-T stage 1": (64, 2, 56),
                                   "HorNet-T stage 3": (256, 4, 14)}.items():
        dims = gate_dims(dim, order)
        n = order - 1

        def make(device, dtype, dim=dim, order=order, hw=hw, dims=dims):
            gen = torch.Generator().manual_seed(0)

            def r(*shape, fan_in=1.0):
                return (torch.randn(*shape, generator=gen) / fan_in ** 0.5).to(device, dtype)

            S = sum(dims)
            x = r(batch, dim, hw, hw)
            params = ([r(2 * dim, dim, 1, 1, fan_in=dim), r(2 * dim), r(S, 1, 7, 7, fan_in=16), r(S)]
                      + [r(dims[i + 1], dims[i], 1, 1, fan_in=dims[i] / 3) for i in range(order - 1)]
                      + [r(dims[i + 1]) for i in range(order - 1)]
                      + [r(dim, dim, 1, 1, fan_in=dim), r(dim)])
            # Token matrices for the floor: one [tokens, width] operand per projection.
            N = batch * hw * hw
            tokens = [r(N, dim)] + [r(N, d) for d in dims[:-1]] + [r(N, dim)]
            return [x] + params + tokens, [x] + params

        def split(a, n=n):
            x, wi, bi, wd, bd = a[:5]
            pw, pb = list(a[5:5 + n]), list(a[5 + n:5 + 2 * n])
            return (x, wi, bi, wd, bd, pw, pb, a[5 + 2 * n], a[6 + 2 * n]), a[7 + 2 * n:]

        def fused(*a, order=order, split=split):
            return tm.gnconv(*split(a)[0], order=order, scale=SCALE)

        def eager(*a, order=order, split=split):
            return oracle(*split(a)[0], order=order, scale=SCALE)

        def floor(*a, split=split):
            (x, wi, _, _, _, pw, _, wo, _), tokens = split(a)
            weights = [wi] + pw + [wo]
            return [t @ w.flatten(1).t() for t, w in zip(tokens, weights)]

        label = f"{name} B={batch} {dim}ch order{order} {hw}x{hw}"
        out.append(Case("gnconv", label, make, fused, eager, floor=floor, floor_backward=False))
    return out
