"""Eager PyTorch oracles for every tokenmix op (and module): readable, from the papers' math, the
way the official code computes it. Tests and ``python -m tokenmix check`` compare every fused op
and its gradients with these; the library itself never imports them."""
from tokenmix.reference import deform_conv2d, gather, gnconv, modules, window_attention

__all__ = ["gather", "window_attention", "deform_conv2d", "gnconv", "modules"]
