"""Benchmark cases of windowed attention at Swin-T shapes, against timm's eager path (roll,
partition, attention with relative position bias and shift mask, reverse, roll) in its two
flavours: explicit softmax and torch's scaled_dot_product_attention; on CUDA also against
FlexAttention (compiled) with a window block mask and the bias as a score_mod."""
from __future__ import annotations

from typing import List

import torch

from tokenmix.bench.harness import Case
from tokenmix.nn import GlobalWindowAttention, WindowAttention
import tokenmix.ops as tm
from tokenmix.reference.window_attention import region_labels, relative_position_index
from tokenmix.samples import Draw, ModuleSample, Sample, seeded


def _timm_mask(H, W, window, shift, device, dtype):
    """timm's SW-MSA mask: -100 between tokens of different regions, [nW, T, T]."""
    lab = region_labels(H, W, (window, window), (shift, shift), device)
    win = lab.view(H // window, window, W // window, window).transpose(1, 2).reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros(diff.shape, dtype=dtype, device=device).masked_fill(diff != 0, -100.0)


def timm_window_attention(qkv, table, idx, mask, heads, window, shift, sdpa=False):
    """timm SwinTransformerBlock._attn + WindowAttention.forward, minus the two Linear layers:
    qkv [B, H, W, 3C] -> [B, H, W, C]. idx (relative position index) and mask (shift mask) are
    the buffers timm precomputes at construction."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // heads
    T = window * window
    if shift:
        qkv = torch.roll(qkv, (-shift, -shift), (1, 2))
    x = qkv.view(B, H // window, window, W // window, window, C3).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, T, C3)
    q, k, v = x.reshape(-1, T, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    bias = table[idx.view(-1)].view(T, T, -1).permute(2, 0, 1).unsqueeze(0)
    nw = (H // window) * (W // window)
    if sdpa:
        attn_mask = bias
        if mask is not None:
            attn_mask = attn_mask + mask.view(1, nw, 1, T, T).expand(B, -1, heads, -1, -1).reshape(-1, heads, T, T)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        attn = (q * d ** -0.5) @ k.transpose(-2, -1) + bias
        if mask is not None:
            attn = (attn.view(-1, nw, heads, T, T) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, T, T)
        o = attn.softmax(-1) @ v
    o = o.transpose(1, 2).reshape(-1, window, window, C)
    o = o.view(B, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    if shift:
        o = torch.roll(o, (shift, shift), (1, 2))
    return o


_FLEX = {}


def flex_window_attention(qkv, table, idx, mask, heads, window, shift):
    """The same attention through FlexAttention, as a user of it would write it: after the roll,
    tokens in window-major order (each window's T tokens contiguous, so the block mask is nearly
    block-diagonal), a mask_mod keeping pairs in the same window and shift region, and the relative
    position bias as a score_mod. flex_attention is compiled once and the block mask built once per
    shape, outside the timed call (as timm builds its mask at construction)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d, T, L = C // heads, window * window, H * W
    key = (H, W, window, shift, qkv.device)
    if key not in _FLEX:
        lab = region_labels(H, W, (window, window), (shift, shift), qkv.device)
        lab = lab.view(H // window, window, W // window, window).transpose(1, 2).reshape(L)

        def same_window_region(b, h, qi, ki):
            return (qi // T == ki // T) & (lab[qi] == lab[ki])

        _FLEX.setdefault("attend", torch.compile(flex_attention))
        _FLEX[key] = create_block_mask(same_window_region, None, None, L, L, device=qkv.device)
    rel = idx.view(T, T)

    def bias(score, b, h, qi, ki):
        return score + table[rel[qi % T, ki % T], h]

    if shift:
        qkv = torch.roll(qkv, (-shift, -shift), (1, 2))
    x = qkv.view(B, H // window, window, W // window, window, 3, heads, d).permute(5, 0, 6, 1, 3, 2, 4, 7)
    q, k, v = x.reshape(3, B, heads, L, d).unbind(0)
    o = _FLEX["attend"](q, k, v, score_mod=bias, block_mask=_FLEX[key])
    o = o.view(B, heads, H // window, W // window, window, window, d).permute(0, 2, 4, 3, 5, 1, 6)
    o = o.reshape(B, H, W, C)
    if shift:
        o = torch.roll(o, (shift, shift), (1, 2))
    return o


def fused_window_attention(qkv, table, idx, mask, heads, window, shift):
    B, H, W, C3 = qkv.shape
    q, k, v = qkv.view(B, H, W, 3, heads, C3 // (3 * heads)).unbind(3)
    out = tm.window_attention(q, k, v, window_size=window, shift_size=shift, bias_table=table)
    return out.view(B, H, W, C3 // 3)


def swin_model_case(batch: int) -> Case | None:
    """Whole swin_tiny_patch4_window7_224 forward, accelerated vs original (needs timm)."""
    try:
        import timm
    except Exception:  # not installed, or broken by a mismatched torchvision
        return None
    import copy

    import tokenmix

    models = {}

    def make(device, dtype):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        base = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval().to(device, dtype)
        models["base"], models["fused"] = base, tokenmix.accelerate(copy.deepcopy(base))
        return [torch.randn(batch, 3, 224, 224, generator=gen).to(device, dtype)], []

    return Case("swin_tiny (model)", f"swin_tiny_patch4_window7_224 B={batch} 224", make,
                lambda x: models["fused"](x), lambda x: models["base"](x), backward=False,
                exact=lambda x: models["base"](x), heavy=True)


def cases(batch: int, device_type: str = "cpu") -> list[Case]:
    model = swin_model_case(batch)
    out = [model] if model is not None else []
    for stage, (H, heads, shift) in {"Swin-T stage 1": (56, 3, 3), "Swin-T stage 3": (14, 12, 3)}.items():
        window, d = 7, 32

        def make(device, dtype, H=H, heads=heads, shift=shift, window=window, d=d):
            gen = torch.Generator().manual_seed(0)
            qkv = torch.randn(batch, H, H, 3 * heads * d, generator=gen).to(device, dtype)
            table = (0.02 * torch.randn(169, heads, generator=gen)).to(device, dtype)
            idx = relative_position_index(window, window, device)
            mask = _timm_mask(H, H, window, shift, device, dtype) if shift else None
            return [qkv, table, idx, mask], [qkv, table]

        name = f"{stage} B={batch} {H}x{H} {heads}x{d} w7 s{shift}"
        kw = dict(heads=heads, window=window, shift=shift)
        # Q K^T and P V forward; backward recomputes S and computes dV, dP, dQ and dK: five
        # products of 2 T^2 d FLOPs per window and head, B H W / T windows x heads of them.
        product = 2 * batch * H * H * window * window * d * heads
        flops = dict(flops_fwd=2 * product, flops_bwd=5 * product)
        out.append(Case("window_attention", name, make,
                        lambda *a, kw=kw: fused_window_attention(*a, **kw),
                        lambda *a, kw=kw: timm_window_attention(*a, **kw), **flops))
        out.append(Case("window_attention", name + " vs SDPA", make,
                        lambda *a, kw=kw: fused_window_attention(*a, **kw),
                        lambda *a, kw=kw: timm_window_attention(*a, sdpa=True, **kw), **flops))
        if device_type == "cuda":
            out.append(Case("window_attention", name + " vs FlexAttention", make,
                            lambda *a, kw=kw: fused_window_attention(*a, **kw),
                            lambda *a, kw=kw: flex_window_attention(*a, **kw),
                            exact=lambda *a, kw=kw: timm_window_attention(
                                *[t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                  for t in a], **kw),
                            compile_target=lambda *a, kw=kw: timm_window_attention(*a, **kw), **flops))
    return out


# ---- samples: small arguments for opcheck, compile and `python -m tokenmix check` ----------

def window_attention_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """Shifted windows and GC ViT's global queries; the accepted mix (an fp32 bias table beside
    bf16 q, k, v); and, for the accuracy check, the CUDA kernels' paths: head_dim 16 and 32 (32
    with at most 64 tokens a window runs fp16/bf16 forwards on tensor cores), partial border
    windows, a rectangular window."""
    r = Draw(device, dtype)
    q, k, v = (r.randn(2, 8, 8, 2, 8) for _ in range(3))
    out = [
        Sample("window_attention_shifted", "window_attention",
               (q, k, v, [4, 4], [2, 2], r.randn(49, 2), None)),
        Sample("window_attention_global_q", "window_attention",
               (r.randn(2, 4, 4, 2, 8), k, v, [4, 4], [0, 0], r.randn(49, 2), 0.3)),
    ]
    mixed = Draw(device, torch.bfloat16)
    mq, mk, mv = (mixed.randn(2, 8, 8, 2, 8) for _ in range(3))
    out.append(Sample("window_attention_fp32_table", "window_attention",
                      (mq, mk, mv, [4, 4], [2, 2], mixed.randn(49, 2, dtype=torch.float32), None),
                      kind="mixed"))
    for d in (16, 32):
        q, k, v = (r.randn(2, 14, 14, 2, d) for _ in range(3))
        pk, pv = r.randn(2, 13, 11, 2, d), r.randn(2, 13, 11, 2, d)
        out += [
            Sample(f"window_attention_d{d}_shifted", "window_attention",
                   (q, k, v, [7, 7], [3, 3], r.randn(169, 2), None), kind="kernel"),
            Sample(f"window_attention_d{d}_partial", "window_attention",
                   (r.randn(2, 13, 11, 2, d), pk, pv, [7, 7], [0, 0], None, None), kind="kernel"),
            Sample(f"window_attention_d{d}_global_q", "window_attention",
                   (r.randn(2, 7, 7, 2, d), pk, pv, [7, 7], [0, 0], r.randn(169, 2), None), kind="kernel"),
        ]
    q, k, v = (r.randn(2, 13, 11, 2, 16) for _ in range(3))
    out.append(Sample("window_attention_rect_partial", "window_attention",
                      (q, k, v, [4, 6], [0, 0], None, None), kind="kernel"))
    return out




def window_attention_module_sample() -> ModuleSample:
    """Swin's shifted-window attention on an 8x8 map, 2 heads of 16."""
    mod = seeded(lambda: WindowAttention(32, 2, window_size=4, shift_size=2))
    return ModuleSample("WindowAttention", mod, (Draw("cpu", torch.float32).randn(2, 8, 8, 32),), ("x",))


def global_window_attention_module_sample() -> ModuleSample:
    """GC ViT's global-query attention: one window of queries per image."""
    mod = seeded(lambda: GlobalWindowAttention(32, 2, window_size=4))
    r = Draw("cpu", torch.float32)
    return ModuleSample("GlobalWindowAttention", mod, (r.randn(2, 8, 8, 32), r.randn(2, 4, 4, 32)),
                        ("x", "q_global"))
