"""Benchmark cases of deformable convolution: LIT's stage-1 token merging (k = s = 2) and a
DCNv2 3x3 layer, against torchvision's deform_conv2d, torch.compile of the tokenmix oracle, and
the plain convolution of the same shape as the floor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import tokenmix.ops as tm
from tokenmix.bench.harness import Case
from tokenmix.reference.deform_conv2d import deform_conv2d as oracle


def cases(batch: int) -> list[Case]:
    try:
        from torchvision.ops import deform_conv2d as tv
    except Exception:  # not installed, or built for another torch
        return []
    out = []
    for name, (cin, cout, hw, k, s, p, use_mask) in {
        "LIT stage-1 merge": (64, 128, 56, 2, 2, 0, False),
        "DCNv2 3x3": (64, 64, 56, 3, 1, 1, True),
    }.items():
        def make(device, dtype, cin=cin, cout=cout, hw=hw, k=k, s=s, p=p, use_mask=use_mask):
            gen = torch.Generator().manual_seed(0)
            ho = (hw + 2 * p - k) // s + 1
            x = torch.randn(batch, cin, hw, hw, generator=gen).to(device, dtype)
            off = torch.randn(batch, 2 * k * k, ho, ho, generator=gen).to(device, dtype)
            w = (torch.randn(cout, cin, k, k, generator=gen) / (cin * k)).to(device, dtype)
            b = torch.randn(cout, generator=gen).to(device, dtype)
            m = torch.rand(batch, k * k, ho, ho, generator=gen).to(device, dtype) if use_mask else None
            return [x, off, w, b, m], [x, off, w, b] + ([m] if use_mask else [])

        kw = dict(stride=s, padding=p)
        label = f"{name} B={batch} {cin}->{cout} {hw}x{hw} k{k} s{s}" + (" mask" if use_mask else "")
        out.append(Case(
            "deform_conv2d", label, make,
            lambda x, off, w, b, m, kw=kw: tm.deform_conv2d(x, off, w, b, mask=m, **kw),
            lambda x, off, w, b, m, kw=kw: tv(x, off, w, b, mask=m, **kw),
            compile_target=lambda x, off, w, b, m, kw=kw: oracle(x, off, w, b, mask=m, **kw),
            floor=lambda x, off, w, b, m, kw=kw: F.conv2d(x, w, b, **kw)))
    return out
