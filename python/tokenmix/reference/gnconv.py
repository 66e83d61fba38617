"""Eager oracle of HorNet's recursive gated convolution (gnConv), written from the paper's math
the way HorNet's code computes it: 1x1 projection, depthwise conv of the gate channels, split,
then a chain of 1x1 convolutions each multiplied by its gate."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gate_dims(dim: int, order: int) -> list[int]:
    """Widths of the gating steps, narrowest first: ``dim / 2**(order-1), ..., dim / 2, dim``."""
    return [dim // 2 ** i for i in range(order)][::-1]


def gated_chain(fused: Tensor, dwconv, pw_weights: Sequence[Tensor], pw_biases: Sequence[Tensor],
                proj_out_weight: Tensor, proj_out_bias: Tensor, order: int, scale: float) -> Tensor:
    """Everything after proj_in; `dwconv` maps the gate channels [B, sum(dims), H, W] to the
    same shape (a depthwise conv, or HorNet-GF's GlobalLocalFilter)."""
    dims = gate_dims(fused.shape[1] // 2, order)
    pwa, abc = torch.split(fused, (dims[0], sum(dims)), dim=1)
    gates = torch.split(dwconv(abc) * scale, dims, dim=1)
    y = pwa * gates[0]
    for i in range(order - 1):
        y = F.conv2d(y, pw_weights[i], pw_biases[i]) * gates[i + 1]
    return F.conv2d(y, proj_out_weight, proj_out_bias)


def gnconv(x: Tensor, proj_in_weight: Tensor, proj_in_bias: Tensor, dw_weight: Tensor,
           dw_bias: Tensor, pw_weights: Sequence[Tensor], pw_biases: Sequence[Tensor],
           proj_out_weight: Tensor, proj_out_bias: Tensor, *, order: int, scale: float) -> Tensor:
    k = dw_weight.shape[-1]
    fused = F.conv2d(x, proj_in_weight, proj_in_bias)
    dw = lambda t: F.conv2d(t, dw_weight, dw_bias, padding=(k - 1) // 2, groups=t.shape[1])  # noqa: E731
    return gated_chain(fused, dw, pw_weights, pw_biases, proj_out_weight, proj_out_bias, order, scale)


class GnConv(nn.Module):
    """HorNet's ``gnconv`` module in eager PyTorch (the benchmark's baseline), same keys as
    ``tokenmix.nn.GnConv``: ``proj_in``, ``dwconv``, ``pws.{i}``, ``proj_out``."""

    def __init__(self, dim: int, order: int = 5, s: float = 1.0 / 3, kernel_size: int = 7,
                 dwconv: nn.Module | None = None):
        super().__init__()
        self.order, self.scale = order, s
        self.dims = gate_dims(dim, order)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        self.dwconv = dwconv if dwconv is not None else nn.Conv2d(
            sum(self.dims), sum(self.dims), kernel_size, padding=(kernel_size - 1) // 2,
            groups=sum(self.dims))
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        fused = self.proj_in(x)
        pwa, abc = torch.split(fused, (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        y = pwa * gates[0]
        for i in range(self.order - 1):
            y = self.pws[i](y) * gates[i + 1]
        return self.proj_out(y)
