"""Eager PyTorch oracles for every tokenmix op: readable, from the papers' math, the way the
official code computes it. Tests compare every fused op and its gradients with these."""
from tokenmix.reference import deform_conv2d, gather, gnconv, window_attention

__all__ = ["gather", "window_attention", "deform_conv2d", "gnconv"]
