"""Eager oracles of the ``tokenmix.nn`` modules: each module's computation written with the op
oracles of this package and plain torch, its parameters taken from a dict (as
``torch.func.functional_call`` passes them), so that the same forward runs in fp64, in a low
precision or under autocast. Every function is ``forward(module, params, *inputs)``: the module
supplies only its configuration (window, heads, order, ...) and buffers."""
from __future__ import annotations

from typing import Dict

import torch.nn.functional as F
from torch import Tensor, nn

from tokenmix.reference import deform_conv2d as _deform
from tokenmix.reference import gnconv as _gnconv
from tokenmix.reference import window_attention as _window

__all__ = ["window_attention", "global_window_attention", "deform_conv2d_pack", "deformable_patch_merging",
           "gnconv"]

Params = Dict[str, Tensor]


def window_attention(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.WindowAttention`` on a map whose sides are multiples of the window."""
    B, H, W, _ = x.shape
    qkv = F.linear(x, p["qkv.weight"], p.get("qkv.bias")).view(B, H, W, 3, mod.num_heads, mod.head_dim)
    q, k, v = qkv.unbind(3)
    out = _window.window_attention(q, k, v, window_size=mod.window_size, shift_size=mod.shift_size,
                                   bias_table=p["relative_position_bias_table"], scale=mod.scale)
    return F.linear(out.reshape(B, H, W, -1), p["proj.weight"], p["proj.bias"])


def global_window_attention(mod: nn.Module, p: Params, x: Tensor, q_global: Tensor) -> Tensor:
    """``tokenmix.nn.GlobalWindowAttention`` with ``use_global`` and global queries."""
    B, H, W, C = x.shape
    h, d = mod.num_heads, mod.head_dim
    k, v = F.linear(x, p["qkv.weight"], p.get("qkv.bias")).view(B, H, W, 2, h, d).unbind(3)
    q = q_global.reshape(B, *mod.window_size, h, d)
    out = _window.window_attention(q, k, v, window_size=mod.window_size,
                                   bias_table=p["rel_pos.relative_position_bias_table"], scale=mod.scale)
    return F.linear(out.reshape(B, H, W, C), p["proj.weight"], p["proj.bias"])


def deform_conv2d_pack(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.DeformConv2dPack``: offsets from its own convolution, then the DCN."""
    geometry = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
    off = F.conv2d(x, p["conv_offset.weight"], p["conv_offset.bias"], **geometry)
    return _deform.deform_conv2d(x, off, p["weight"], p.get("bias"), **geometry)


def deformable_patch_merging(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.DeformablePatchMerging`` in eval mode (BatchNorm with its running
    statistics, which are buffers and come from the module)."""
    k = mod.kernel_size
    off = F.conv2d(x, p["dconv.conv_offset.weight"], p["dconv.conv_offset.bias"], stride=k)
    y = _deform.deform_conv2d(x, off, p["dconv.weight"], p["dconv.bias"], stride=k)
    stats = (mod.norm_layer.running_mean.to(y.dtype), mod.norm_layer.running_var.to(y.dtype))
    y = F.batch_norm(y, *stats, p["norm_layer.weight"], p["norm_layer.bias"], False, 0.0, mod.norm_layer.eps)
    return F.gelu(y).flatten(2).transpose(1, 2)


def gnconv(mod: nn.Module, p: Params, x: Tensor) -> Tensor:
    """``tokenmix.nn.GnConv`` with its depthwise convolution (no ``gflayer``)."""
    n = mod.order - 1
    return _gnconv.gnconv(x, p["proj_in.weight"], p["proj_in.bias"], p["dwconv.weight"], p["dwconv.bias"],
                          [p[f"pws.{i}.weight"] for i in range(n)], [p[f"pws.{i}.bias"] for i in range(n)],
                          p["proj_out.weight"], p["proj_out.bias"], order=mod.order, scale=mod.scale)
