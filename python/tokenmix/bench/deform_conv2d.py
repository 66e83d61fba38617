"""Benchmark cases of deformable convolution: LIT's stage-1 token merging (k = s = 2) and a
DCNv2 3x3 layer, against torchvision's deform_conv2d, torch.compile of the tokenmix oracle, and
the plain convolution of the same shape as the floor."""
from __future__ import annotations

from typing import List

import torch
from torch import nn
import torch.nn.functional as F

from tokenmix.bench.harness import Case
from tokenmix.nn import DeformConv2dPack
import tokenmix.ops as tm
from tokenmix.reference.deform_conv2d import deform_conv2d as oracle
from tokenmix.samples import Draw, ModuleSample, Sample, seeded


def cases(batch: int, device_type: str = "cpu") -> list[Case]:
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
        # The GEMM over the sampled columns (2 FLOPs a multiply-add); backward: the columns'
        # gradient and the weight gradient, each as large again.
        ho = (hw + 2 * p - k) // s + 1
        fwd = 2 * batch * ho * ho * cout * cin * k * k
        out.append(Case(
            "deform_conv2d", label, make,
            lambda x, off, w, b, m, kw=kw: tm.deform_conv2d(x, off, w, b, mask=m, **kw),
            lambda x, off, w, b, m, kw=kw: tv(x, off, w, b, mask=m, **kw),
            compile_target=lambda x, off, w, b, m, kw=kw: oracle(x, off, w, b, mask=m, **kw),
            floor=lambda x, off, w, b, m, kw=kw: F.conv2d(x, w, b, **kw), flops_fwd=fwd, flops_bwd=2 * fwd))
    return out


# ---- samples: small arguments for opcheck, compile and `python -m tokenmix check` ----------

def deform_conv2d_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """DCNv2 with 2 groups and 2 offset groups; for the accuracy check also LIT's merge (k = s = 2,
    40 channels: two full 16-channel runs per sampling item and a tail) and a layer whose fp16/bf16
    CUDA forward runs the fused kernel across two output-channel block columns, with chunks that
    cross taps and offset groups and a partial row block."""
    r = Draw(device, dtype)
    return [
        Sample("deform_conv2d", "deform_conv2d",
               (r.randn(2, 4, 6, 6), r.randn(2, 2 * 2 * 9, 6, 6), r.randn(4, 2, 3, 3), r.randn(4),
                [1, 1], [1, 1], [1, 1], r.rand(2, 2 * 9, 6, 6))),
        Sample("deform_conv2d_k2_s2_40ch", "deform_conv2d",
               (r.randn(1, 40, 10, 12), r.randn(1, 2 * 4, 5, 6), r.randn(8, 40, 2, 2, scale=1 / 8), None,
                [2, 2], [0, 0], [1, 1], None), kind="kernel"),
        Sample("deform_conv2d_fused_136_out", "deform_conv2d",
               (r.randn(3, 12, 5, 5), r.randn(3, 2 * 2 * 9, 5, 5, scale=2.0), r.randn(136, 12, 3, 3, scale=0.1),
                r.randn(136), [1, 1], [1, 1], [1, 1], r.rand(3, 2 * 9, 5, 5)), kind="kernel"),
    ]




def deform_conv2d_pack_module_sample() -> ModuleSample:
    """A 3x3 DCN layer with its offset branch, the offsets made non-zero."""
    def build() -> nn.Module:
        mod = DeformConv2dPack(6, 8, 3, padding=1)
        with torch.no_grad():
            mod.conv_offset.weight.normal_(0, 0.2)
            mod.conv_offset.bias.normal_(0, 0.5)
        return mod

    return ModuleSample("DeformConv2dPack", seeded(build), (Draw("cpu", torch.float32).randn(2, 6, 7, 9),),
                        ("x",))
