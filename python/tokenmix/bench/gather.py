"""Benchmark cases of the sparse-token gather family at DeiT-S / DynamicViT shapes:
B tokens rows of N = 197 (class token + 14x14 patches), C = 384, 6 heads, keep ratio 0.7."""
from __future__ import annotations

from typing import List

import torch

from tokenmix.bench.harness import Case
import tokenmix.ops as tm
from tokenmix.reference import gather as ref
from tokenmix.samples import Draw, Sample

N, C, HEADS, KEEP = 197, 384, 6, 0.7


def _eager_topk(x, score, k):
    """DynamicViT's pruning step: argsort the patch scores, keep the class token, gather."""
    idx = torch.argsort(score, dim=1, descending=True)[:, :k] + 1
    cls = torch.zeros(x.shape[0], 1, dtype=idx.dtype, device=x.device)
    return ref.batch_index_select(x, torch.cat([cls, idx], dim=1))


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] token indices as indices into the [B * n] rows of a flattened batch."""
    return (index + n * torch.arange(index.shape[0], device=index.device).unsqueeze(1)).reshape(-1)


def _gather_backward_eager(grad, index, n):
    """What autograd runs for the eager gather's backward: a zero [B, n, C] with the K gradient
    rows added in at their tokens."""
    B, K, C = grad.shape
    rows = grad.new_zeros(B * n, C).index_add_(0, _flat_rows(index, n), grad.reshape(-1, C))
    return rows.view(B, n, C)


def _scatter_backward_eager(grad, index):
    """The eager scatter's backward: the incoming gradient with the replaced rows zeroed (for x)
    and those rows gathered (for src)."""
    B, N, C = grad.shape
    flat, g = _flat_rows(index, N), grad.reshape(-1, C)
    return g.index_fill(0, flat, 0).view(B, N, C), g.index_select(0, flat).view(B, -1, C)


def cases(batch: int, device_type: str = "cpu") -> list[Case]:
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

    def make_gather_grad(device, dtype):
        gen = torch.Generator().manual_seed(0)
        grad = torch.randn(B, K, C, generator=gen).to(device, dtype)
        return [grad, kept_index(device, gen), N], []

    def make_scatter_grad(device, dtype):
        gen = torch.Generator().manual_seed(0)
        return [tokens(device, dtype, gen), kept_index(device, gen)], []

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
        # The backward kernels alone (their one timed pass, reported as "fwd"), against the ATen
        # kernels eager autograd runs for the same gradients: the fwd+bwd rows above also time the
        # autograd engine, the gradient's allocation and its accumulation into .grad, which every
        # variant pays alike.
        Case("gather_tokens", f"DeiT-S {shape} K={K}, backward kernel alone", make_gather_grad,
             torch.ops.tokenmix.gather_tokens_backward, _gather_backward_eager,
             bytes_fwd=lambda dt: (rows_kc + B * N * C) * size(dt), backward=False),
        Case("scatter_tokens", f"DeiT-S {shape} K={K}, backward kernel alone", make_scatter_grad,
             torch.ops.tokenmix.scatter_tokens_backward, _scatter_backward_eager,
             bytes_fwd=lambda dt: (2 * B * N * C + rows_kc) * size(dt), backward=False),
        Case("policy_softmax", f"DeiT-S B={B} h={HEADS} N={N}", make_policy, tm.policy_softmax,
             ref.policy_softmax,
             bytes_fwd=lambda dt: 2 * attn * size(dt),
             bytes_bwd=lambda dt: 3 * attn * size(dt)),
    ]


# ---- samples: small arguments for opcheck, compile and `python -m tokenmix check` ----------

def gather_tokens_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """Duplicated indices into ``[B, N, C]`` tokens, and ``[B, N]`` values with int32 indices."""
    r = Draw(device, dtype)
    return [
        Sample("gather_tokens", "gather_tokens", (r.randn(3, 11, 8), r.index(11, 3, 5))),
        Sample("gather_tokens_2d_int32", "gather_tokens", (r.randn(3, 11), r.index(11, 3, 5, dtype=torch.int32))),
    ]


def scatter_tokens_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    return [Sample("scatter_tokens", "scatter_tokens",
                   (r.randn(3, 11, 8), r.unique_index(3, 11, 5), r.randn(3, 5, 8)))]


def topk_tokens_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = Draw(device, dtype)
    return [Sample("topk_tokens", "topk_tokens", (r.randn(3, 11, 8), r.randn(3, 10), 4), {"keep_first": 1})]


def policy_softmax_samples(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """DynamicViT's shapes in miniature, and the accepted mix: an fp32 policy beside bf16 logits."""
    r = Draw(device, dtype)
    mixed = Draw(device, torch.bfloat16)
    return [
        Sample("policy_softmax", "policy_softmax", (r.randn(3, 2, 11, 11), r.rand(3, 11), 1e-6)),
        Sample("policy_softmax_fp32_policy", "policy_softmax",
               (mixed.randn(2, 2, 7, 7), mixed.rand(2, 7, dtype=torch.float32), 1e-6), kind="mixed"),
    ]
