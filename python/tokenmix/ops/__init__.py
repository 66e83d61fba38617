"""Functional API: one module per op family (torch.ops.tokenmix.* underneath)."""
from tokenmix.ops.gather import gather_tokens, policy_softmax, scatter_tokens, topk_tokens

__all__ = ["gather_tokens", "scatter_tokens", "topk_tokens", "policy_softmax"]
