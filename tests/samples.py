"""Small sample inputs per op, shared by test_opcheck.py and test_compile.py. Each later op family
adds its entries here."""
from __future__ import annotations

import torch


def _tokens(B, N, C, device, dtype, gen):
    return torch.randn(B, N, C, generator=gen, dtype=dtype).to(device)


def gather_samples(device: str, dtype: torch.dtype = torch.float32):
    """(name, op, args, kwargs) for every op of the gather family."""
    gen = torch.Generator().manual_seed(0)
    B, N, C, K = 3, 11, 8, 5
    x = _tokens(B, N, C, device, dtype, gen)
    dup = torch.randint(0, N, (B, K), generator=gen).to(device)
    uniq = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(device)
    src = _tokens(B, K, C, device, dtype, gen)
    score = torch.randn(B, N - 1, generator=gen, dtype=dtype).to(device)
    logits = torch.randn(B, 2, N, N, generator=gen, dtype=dtype).to(device)
    policy = torch.rand(B, N, generator=gen, dtype=dtype).to(device)
    ops = torch.ops.tokenmix
    return [
        ("gather_tokens", ops.gather_tokens.default, (x, dup), {}),
        ("scatter_tokens", ops.scatter_tokens.default, (x, uniq, src), {}),
        ("topk_tokens", ops.topk_tokens.default, (x, score, 4), {"keep_first": 1}),
        ("policy_softmax", ops.policy_softmax.default, (logits, policy, 1e-6), {}),
    ]


def window_attention_samples(device: str, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    B, H, W, heads, d = 2, 8, 8, 2, 8
    q, k, v = (torch.randn(B, H, W, heads, d, generator=gen, dtype=dtype).to(device) for _ in range(3))
    qg = torch.randn(B, 4, 4, heads, d, generator=gen, dtype=dtype).to(device)
    table = torch.randn(49, heads, generator=gen, dtype=dtype).to(device)
    op = torch.ops.tokenmix.window_attention.default
    return [
        ("window_attention_shifted", op, (q, k, v, [4, 4], [2, 2], table, None), {}),
        ("window_attention_global_q", op, (qg, k, v, [4, 4], [0, 0], table, 0.3), {}),
    ]


def deform_conv2d_samples(device: str, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=dtype).to(device)
    off = torch.randn(2, 2 * 2 * 9, 6, 6, generator=gen, dtype=dtype).to(device)
    w = torch.randn(4, 2, 3, 3, generator=gen, dtype=dtype).to(device)
    b = torch.randn(4, generator=gen, dtype=dtype).to(device)
    m = torch.rand(2, 2 * 9, 6, 6, generator=gen, dtype=dtype).to(device)
    op = torch.ops.tokenmix.deform_conv2d.default
    return [("deform_conv2d", op, (x, off, w, b, [1, 1], [1, 1], [1, 1], m), {})]


def gnconv_samples(device: str, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    dim, order, k = 8, 3, 3
    dims = [dim // 4, dim // 2, dim]

    def r(*shape):
        return (0.5 * torch.randn(*shape, generator=gen, dtype=dtype)).to(device)

    x = r(2, dim, 5, 6)
    pw = [r(dims[i + 1], dims[i], 1, 1) for i in range(order - 1)]
    pb = [r(dims[i + 1]) for i in range(order - 1)]
    args = (x, r(2 * dim, dim, 1, 1), r(2 * dim), r(sum(dims), 1, k, k), r(sum(dims)), pw, pb,
            r(dim, dim, 1, 1), r(dim))
    return [("gnconv", torch.ops.tokenmix.gnconv.default, args, {"order": order, "scale": 0.5})]


def mixed_dtype_samples(device: str, dtype: torch.dtype = torch.float32):
    """The mixes accepted without autocast: fp32 bias table or policy beside bf16 activations,
    [B, N] values with int32 indices."""
    gen = torch.Generator().manual_seed(0)
    low = torch.bfloat16
    q, k, v = (torch.randn(2, 8, 8, 2, 8, generator=gen).to(device, low) for _ in range(3))
    table = torch.randn(49, 2, generator=gen).to(device)
    logits = torch.randn(2, 2, 7, 7, generator=gen).to(device, low)
    policy = torch.rand(2, 7, generator=gen).to(device)
    values = torch.randn(3, 11, generator=gen, dtype=dtype).to(device)
    idx32 = torch.randint(0, 11, (3, 5), generator=gen, dtype=torch.int32).to(device)
    ops = torch.ops.tokenmix
    return [
        ("window_attention_fp32_table", ops.window_attention.default, (q, k, v, [4, 4], [2, 2], table, None), {}),
        ("policy_softmax_fp32_policy", ops.policy_softmax.default, (logits, policy, 1e-6), {}),
        ("gather_tokens_2d_int32", ops.gather_tokens.default, (values, idx32), {}),
    ]


def all_samples(device: str, dtype: torch.dtype = torch.float32):
    return (gather_samples(device, dtype) + window_attention_samples(device, dtype)
            + deform_conv2d_samples(device, dtype) + gnconv_samples(device, dtype)
            + mixed_dtype_samples(device, dtype))
