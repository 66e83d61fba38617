"""Modules built on tokenmix ops, state_dict-compatible with the official implementations."""
from tokenmix.nn.window_attention import GlobalWindowAttention, RelPosBias, WindowAttention

__all__ = ["WindowAttention", "GlobalWindowAttention", "RelPosBias"]
