"""Window-attention modules, state_dict-compatible with timm's Swin v1 and GC ViT attention."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmix.ops._args import IntPair, pair

__all__ = ["WindowAttention", "GlobalWindowAttention", "RelPosBias"]


def _pair(v: IntPair) -> tuple[int, int]:
    h, w = pair(v)
    return (h, w)


def _table(window: tuple[int, int], heads: int) -> nn.Parameter:
    t = nn.Parameter(torch.empty((2 * window[0] - 1) * (2 * window[1] - 1), heads))
    nn.init.trunc_normal_(t, std=0.02)
    return t


class WindowAttention(nn.Module):
    r"""Swin's (shifted) window multi-head self-attention on ``[B, H, W, dim]`` maps, fused.

    Computes what timm's ``SwinTransformerBlock._attn`` computes with its ``WindowAttention``:
    ``proj(window_attention(qkv(x)))`` with a relative position bias, and for ``shift_size > 0``
    the cyclic shift and region mask. When ``H`` or ``W`` is not a multiple of the window the map
    is padded with zeros before ``qkv`` (after the shift, as timm does), so padded tokens take part
    as keys exactly as in timm, and the result is cropped.

    Parameters (state_dict names as timm's ``WindowAttention``): ``qkv`` (Linear dim -> 3 dim),
    ``proj`` (Linear dim -> dim), ``relative_position_bias_table`` ``[(2wh-1)(2ww-1), heads]``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: IntPair = 7, shift_size: IntPair = 0,
                 qkv_bias: bool = True, *, head_dim: int | None = None, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.window_size = _pair(window_size)
        self.shift_size = _pair(shift_size)
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.relative_position_bias_table = _table(self.window_size, num_heads)
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        wh, ww = self.window_size
        sh, sw = self.shift_size
        pad_h = (wh - H % wh) % wh
        pad_w = (ww - W % ww) % ww
        shifted = sh > 0 or sw > 0
        # Under torch.fx and torch.jit.trace (and dynamic-shape compiles) the sizes are proxies,
        # tensors or symbols, not ints: the map is then always padded, possibly by zero, so the
        # padding follows the input size instead of being frozen into the graph. Eager, scripted
        # and static-shape compiled code skip it when the size needs none, since the pad, crop
        # and rolls copy the map up to five times.
        padded = not (isinstance(pad_h, int) and isinstance(pad_w, int) and pad_h == 0 and pad_w == 0)
        if padded:
            # timm rolls over the H x W map and pads afterwards; the op rolls over the padded map.
            # Rolling the padded map back by the shift makes the op's roll land on timm's layout.
            if shifted:
                x = torch.roll(x, (-sh, -sw), (1, 2))
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            if shifted:
                x = torch.roll(x, (sh, sw), (1, 2))
        Hp, Wp = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        out = torch.ops.tokenmix.window_attention(q, k, v, [wh, ww], [sh, sw],
                                                  self.relative_position_bias_table, self.scale)
        out = out.view(B, Hp, Wp, self.num_heads * self.head_dim)
        if padded:
            if shifted:
                out = torch.roll(out, (-sh, -sw), (1, 2))
            out = out[:, :H, :W]
            if shifted:
                out = torch.roll(out, (sh, sw), (1, 2))
        return self.proj_drop(self.proj(out))

    def set_window_size(self, window_size: IntPair, shift_size: IntPair | None = None) -> None:
        """Switch to another window, and shift when given (else the shift is kept).

        The relative position bias table is resampled to the new window by
        :meth:`resize_bias_table` into a new Parameter, so optimizers built before must be rebuilt.
        """
        new = _pair(window_size)
        if shift_size is not None:
            self.shift_size = _pair(shift_size)
        if new == self.window_size:
            return
        table = self.relative_position_bias_table
        with torch.no_grad():
            resized = self.resize_bias_table(table.detach(), self.window_size, new)
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
        self.window_size = new

    def resize_bias_table(self, table: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
        """The bias table for window `new` from the one for window `old`: each head's grid of
        ``(2h - 1) x (2w - 1)`` relative offsets, resampled bicubically."""
        heads = table.shape[1]
        grid = table.t().reshape(1, heads, 2 * old[0] - 1, 2 * old[1] - 1).float()
        grid = F.interpolate(grid, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bicubic",
                             align_corners=False)
        return grid.reshape(heads, -1).t().contiguous().to(table.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")


class RelPosBias(nn.Module):
    """Holds the relative position bias table under timm's ``rel_pos`` key."""

    def __init__(self, window_size: IntPair, num_heads: int):
        super().__init__()
        self.window_size = _pair(window_size)
        self.relative_position_bias_table = _table(self.window_size, num_heads)


class GlobalWindowAttention(nn.Module):
    r"""GC ViT's window attention on ``[B, H, W, dim]`` maps, fused, local or with global queries.

    With ``use_global`` and a ``q_global`` of shape ``[B, wh, ww, dim]``, the keys and values come
    from ``qkv(x)`` (dim -> 2 dim) and every window of image ``b`` is queried by ``q_global[b]``
    (GC ViT's global attention); otherwise ``qkv`` gives q, k and v (local attention). Parameters
    as timm's ``WindowAttentionGlobal``: ``qkv``, ``rel_pos.relative_position_bias_table``,
    ``proj``. H and W must be multiples of the window, as in GC ViT.
    """

    def __init__(self, dim: int, num_heads: int, window_size: IntPair, use_global: bool = True,
                 qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = _pair(window_size)
        self.scale = self.head_dim ** -0.5
        self.use_global = use_global
        self.rel_pos = RelPosBias(self.window_size, num_heads)
        self.qkv = nn.Linear(dim, dim * (2 if use_global else 3), bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, q_global: Optional[Tensor] = None) -> Tensor:
        B, H, W, C = x.shape
        heads, d = self.num_heads, self.head_dim
        wh, ww = self.window_size
        if self.use_global and q_global is not None:
            k, v = self.qkv(x).view(B, H, W, 2, heads, d).unbind(3)
            q = q_global.reshape(B, wh, ww, heads, d)
        else:
            q, k, v = self.qkv(x).view(B, H, W, 3, heads, d).unbind(3)
        out = torch.ops.tokenmix.window_attention(q, k, v, [wh, ww], [0, 0],
                                                  self.rel_pos.relative_position_bias_table, self.scale)
        return self.proj_drop(self.proj(out.view(B, H, W, C)))
