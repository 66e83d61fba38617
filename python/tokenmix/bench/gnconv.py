"""Benchmark cases of HorNet's recursive gated convolution at HorNet-T shapes: the fused op vs
HorNet's eager gnconv (1x1 convs, depthwise conv, split, gating products), torch.compile of it,
and the compute floor: the block's 1x1 projections alone as plain matmuls on token matrices."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from tokenmix.bench.harness import Case
from tokenmix.nn import GnConv
import tokenmix.ops as tm
from tokenmix.ops.gnconv import gate_dims as op_gate_dims
from tokenmix.reference.gnconv import gate_dims
from tokenmix.reference.gnconv import gnconv as oracle
from tokenmix.samples import Draw, ModuleSample, Sample, seeded

SCALE = 1.0 / 3


def cases(batch: int, device_type: str = "cpu") -> list[Case]:
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
        # Per pixel: proj_in (dim -> 2 dim), the 7x7 depthwise over sum(dims) channels, the gate
        # projections and proj_out, 2 FLOPs a multiply-add; backward: data and weight gradients.
        macs = 2 * dim * dim + 49 * sum(dims) + sum(a * b for a, b in zip(dims, dims[1:])) + dim * dim
        fwd = 2 * macs * batch * hw * hw
        out.append(Case("gnconv", label, make, fused, eager, floor=floor, floor_backward=False,
                        flops_fwd=fwd, flops_bwd=2 * fwd))
    return out


# ---- samples: small arguments for opcheck, compile and `python -m tokenmix check` ----------

def _gnconv_args(r: Draw, dim: int, order: int, k: int, hw: Tuple[int, int], batch: int = 2) -> tuple:
    dims = op_gate_dims(dim, order)
    s = sum(dims)

    def w(*shape: int, fan_in: int) -> Tensor:
        return r.randn(*shape, scale=fan_in ** -0.5)

    pw = [w(dims[i + 1], dims[i], 1, 1, fan_in=dims[i]) for i in range(order - 1)]
    pb = [r.randn(dims[i + 1], scale=0.5) for i in range(order - 1)]
    return (r.randn(batch, dim, *hw), w(2 * dim, dim, 1, 1, fan_in=dim), r.randn(2 * dim, scale=0.5),
            w(s, 1, k, k, fan_in=k * k), r.randn(s, scale=0.5), pw, pb, w(dim, dim, 1, 1, fan_in=dim),
            r.randn(dim, scale=0.5))


def gnconv_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """Order 3 on a small map; for the accuracy check also the depthwise strip kernels (3, 5, 7),
    the generic depthwise kernel (9), a channels_last input, and widths in multiples of 8 with 198
    rows (fp16/bf16 CUDA: the CUTLASS gated GEMMs with a partial tile)."""
    r = Draw(device, dtype)
    out = [Sample("gnconv", "gnconv", _gnconv_args(r, 8, 3, 3, (5, 6)), {"order": 3, "scale": 0.5})]
    for k in (3, 5, 7, 9):
        out.append(Sample(f"gnconv_{k}x{k}", "gnconv", _gnconv_args(r, 8, 3, k, (9, 11)),
                          {"order": 3, "scale": 1 / 3}, kind="kernel"))
    x, *params = _gnconv_args(r, 8, 3, 7, (9, 11))
    out.append(Sample("gnconv_channels_last", "gnconv", (x.to(memory_format=torch.channels_last), *params),
                      {"order": 3, "scale": 1 / 3}, kind="kernel"))
    out.append(Sample("gnconv_32ch", "gnconv", _gnconv_args(r, 32, 3, 7, (9, 11)),
                      {"order": 3, "scale": 1 / 3}, kind="kernel"))
    return out




def gnconv_module_sample() -> ModuleSample:
    """HorNet's gnconv of order 3 on 16 channels."""
    mod = seeded(lambda: GnConv(16, order=3))
    return ModuleSample("GnConv", mod, (Draw("cpu", torch.float32).randn(2, 16, 7, 6),), ("x",))
