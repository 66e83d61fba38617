"""Eager oracle of windowed attention, computed the way timm's Swin / GC ViT code does it:
cyclic roll, zero pad, window partition, scaled scores + relative position bias + region mask,
softmax, weighted sum, window reverse, crop, roll back."""
from __future__ import annotations

import torch
from torch import Tensor


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def relative_position_index(wh: int, ww: int, device=None) -> Tensor:
    """Swin's [T, T] index into the [(2wh-1)(2ww-1), heads] bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def region_labels(H: int, W: int, window: tuple[int, int], shift: tuple[int, int], device=None) -> Tensor:
    """Swin's [H, W] region map of the shifted image (one region per dim without shift)."""
    def labels(size, win, s):
        lab = torch.zeros(size, dtype=torch.long, device=device)
        if s:
            lab[size - win:size - s] = 1
            lab[size - s:] = 2
        return lab
    return labels(H, window[0], shift[0])[:, None] * 3 + labels(W, window[1], shift[1])[None, :]


def _partition(x: Tensor, wh: int, ww: int) -> Tensor:
    """[B, Hp, Wp, ...] -> [B, nW, wh*ww, ...]"""
    B, Hp, Wp = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, Hp // wh, wh, Wp // ww, ww, *rest).transpose(2, 3)
    return x.reshape(B, (Hp // wh) * (Wp // ww), wh * ww, *rest)


def _reverse(x: Tensor, Hp: int, Wp: int, wh: int, ww: int) -> Tensor:
    B = x.shape[0]
    rest = x.shape[3:]
    x = x.reshape(B, Hp // wh, Wp // ww, wh, ww, *rest).transpose(2, 3)
    return x.reshape(B, Hp, Wp, *rest)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window_size, shift_size=0,
                     bias_table: Tensor | None = None, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T + bias + mask) v within (shifted) windows; see tokenmix.ops. The
    arguments are the op's, in its order."""
    B, H, W, heads, d = k.shape
    wh, ww = pair(window_size)
    sh, sw = pair(shift_size)
    scale = d ** -0.5 if scale is None else scale
    global_q = q.shape != k.shape
    if sh or sw:
        k, v = (torch.roll(t, (-sh, -sw), (1, 2)) for t in (k, v))
        if not global_q:
            q = torch.roll(q, (-sh, -sw), (1, 2))
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    pad = (0, 0, 0, 0, 0, Wp - W, 0, Hp - H)
    k, v = (torch.nn.functional.pad(t, pad) for t in (k, v))
    exists = torch.zeros(Hp, Wp, dtype=torch.bool, device=k.device)
    exists[:H, :W] = True
    regions = torch.full((Hp, Wp), -1, dtype=torch.long, device=k.device)
    regions[:H, :W] = region_labels(H, W, (wh, ww), (sh, sw), k.device)

    kw, vw = _partition(k, wh, ww), _partition(v, wh, ww)             # [B, nW, T, h, d]
    if global_q:
        qw = q.reshape(B, 1, wh * ww, heads, d)
    else:
        qw = _partition(torch.nn.functional.pad(q, pad), wh, ww)
    ex = _partition(exists[None, :, :, None], wh, ww)[0, :, :, 0]      # [nW, T]
    rg = _partition(regions[None, :, :, None], wh, ww)[0, :, :, 0]
    # Padded query rows (cropped away below) see every existing key, so their softmax is finite.
    allowed = ex[:, None, :] & ((rg[:, :, None] == rg[:, None, :]) | ~ex[:, :, None])  # [nW, Tq, Tk]

    qw, kw, vw = (t.transpose(2, 3) for t in (qw, kw, vw))             # [B, nW, h, T, d]
    attn = (qw * scale) @ kw.transpose(-2, -1)                        # [B, nW, h, T, T]
    if bias_table is not None:
        idx = relative_position_index(wh, ww, k.device)
        attn = attn + bias_table[idx.reshape(-1)].reshape(wh * ww, wh * ww, heads).permute(2, 0, 1)
    attn = attn.masked_fill(~allowed[None, :, None], float("-inf"))
    out = attn.softmax(-1) @ vw                                       # [B, nW, h, T, d]
    out = _reverse(out.transpose(2, 3), Hp, Wp, wh, ww)[:, :H, :W]
    if sh or sw:
        out = torch.roll(out, (sh, sw), (1, 2))
    return out.contiguous()
