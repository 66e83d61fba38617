"""Functional API: one module per op family (torch.ops.tokenmix.* underneath)."""
from tokenmix.ops.deform_conv2d import deform_conv2d
from tokenmix.ops.gnconv import gnconv
from tokenmix.ops.gather import gather_tokens, policy_softmax, scatter_tokens, topk_tokens
from tokenmix.ops.window_attention import window_attention

__all__ = ["gather_tokens", "scatter_tokens", "topk_tokens", "policy_softmax", "window_attention",
           "deform_conv2d", "gnconv"]
