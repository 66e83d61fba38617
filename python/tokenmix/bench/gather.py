"""Benchmark cases of the sparse-token gather family at DeiT-S / DynamicViT shapes:
B tokens rows of N = 197 (class token + 14x14 patches), C = 384, 6 heads, keep ratio 0.7."""
from __future__ import annotations

import torch

import tokenmix.ops as tm
from tokenmix.bench.harness import Case
from tokenmix.reference import gather as ref

N, C, HEADS, KEEP = 197, 384, 6, 0.7


def _eager_topk(x, score, k):
    """DynamicViT's pruning step: argsort the patch scores, keep the class token, gather."""
    idx = torch.argsort(score, dim=1, descending=True)[:, :k] + 1
    cls = torch.zeros(x.shape[0], 1, dtype=idx.dtype, device=x.device)
    return ref.batch_index_select(x, torch.cat([cls, idx], dim=1))


def cases(batch: int) -> list[Case]:
    B = batch
    k = int((N - 1) * KEEP)  # scored patch tokens kept
    K = k + 1  # plus the class token

    def tokens(device, dtype, gen):
        return torch.randn(B, N, C, generator=gen).to(device, dtype)

    def kept_index(device, gen):
        order = torch.argsort(torch.rand(B, N - 1, generator=gen), dim=1)[:, :k] + 1
        return torch.cat([torch.zeros(B, 1, dtype=torch.long), order], 1).to(device)

    def make_gather(device, dtype):
        gen = torch.Generator().manual_seed(0)
        x = tokens(device, dtype, gen)
        return [x, kept_index(device, gen)], [x]

    def make_scatter(device, dtype):
        gen = torch.Generator().manual_seed(0)
        x = tokens(device, dtype, gen)
        src = torch.randn(B, K, C, generator=gen).to(device, dtype)
        return [x, kept_index(device, gen), src], [x, src]

    def make_topk(device, dtype):
        gen = torch.Generator().manual_seed(0)
        x = tokens(device, dtype, gen)
        return [x, torch.randn(B, N - 1, generator=gen).to(device, dtype)], [x]

    def make_policy(device, dtype):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(B, HEADS, N, N, generator=gen).to(device, dtype)
        policy = (torch.rand(B, N, generator=gen) < KEEP).to(device, dtype)
        return [logits, policy], [logits, policy]

    def size(dt):
        return torch.finfo(dt).bits // 8

    rows_kc = B * K * C
    attn = B * HEADS * N * N
    shape = f"B={B} N={N} C={C}"
    return [
        Case("gather_tokens", f"DeiT-S {shape} K={K}", make_gather, tm.gather_tokens,
             ref.batch_index_select,
             bytes_fwd=lambda dt: 2 * rows_kc * size(dt),
             bytes_bwd=lambda dt: (rows_kc + B * N * C) * size(dt)),
        Case("scatter_tokens", f"DeiT-S {shape} K={K}", make_scatter, tm.scatter_tokens,
             ref.scatter_tokens,
             bytes_fwd=lambda dt: (2 * B * N * C) * size(dt),
             bytes_bwd=lambda dt: (B * N * C + B * N * C + 2 * rows_kc) * size(dt)),
        Case("topk_tokens", f"DeiT-S {shape} k={k}+cls", make_topk,
             lambda x, s: tm.topk_tokens(x, s, k, keep_first=1)[0],
             lambda x, s: _eager_topk(x, s, k),
             bytes_fwd=lambda dt: 2 * rows_kc * size(dt),
             bytes_bwd=lambda dt: (rows_kc + B * N * C) * size(dt)),
        Case("policy_softmax", f"DeiT-S B={B} h={HEADS} N={N}", make_policy, tm.policy_softmax,
             ref.policy_softmax,
             bytes_fwd=lambda dt: 2 * attn * size(dt),
             bytes_bwd=lambda dt: 3 * attn * size(dt)),
    ]
