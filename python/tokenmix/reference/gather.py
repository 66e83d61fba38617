"""Eager oracles of the sparse-token gather family, written the way DynamicViT's official code
computes them (plain torch, differentiable through autograd)."""
from __future__ import annotations

import torch
from torch import Tensor


def batch_index_select(x: Tensor, idx: Tensor) -> Tensor:
    """DynamicViT's ``batch_index_select`` for ``[B, N, C]`` tokens or ``[B, N]`` values: flatten,
    offset, index (int32 or int64 indices)."""
    B, N = x.shape[:2]
    K = idx.shape[1]
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    flat = (idx + offset).reshape(-1)
    return x.reshape(B * N, *x.shape[2:])[flat].reshape(B, K, *x.shape[2:])


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return batch_index_select(x, index)


def scatter_tokens(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Copy of ``x`` with rows ``index[b, k]`` replaced by ``src[b, k]`` (index unique per row)."""
    B, N, C = x.shape
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    flat = (index + offset).reshape(-1)
    # Under autocast src may arrive in another dtype than x; the copy takes x's.
    out = x.reshape(B * N, C).index_put((flat,), src.reshape(-1, C).to(x.dtype))
    return out.reshape(B, N, C)


def topk_tokens(x: Tensor, score: Tensor, k: int, *, keep_first: int = 0) -> tuple[Tensor, Tensor]:
    """DynamicViT's inference-time pruning: argsort the scores, keep the first ``k``, gather."""
    B = x.shape[0]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k] + keep_first
    head = torch.arange(keep_first, device=x.device).expand(B, keep_first)
    index = torch.cat([head, order], dim=1)
    return batch_index_select(x, index), index


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's ``softmax_with_policy`` with ``policy`` given as ``[B, N]``."""
    B, N = policy.shape
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(logits, dim=-1, keepdim=True)[0]
    attn = logits - max_att
    attn = attn.to(torch.float32 if logits.dtype != torch.float64 else torch.float64).exp_()
    attn = attn * attn_policy.to(attn.dtype)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)
