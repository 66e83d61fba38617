"""Modules built on tokenmix ops, state_dict-compatible with the official implementations."""
from tokenmix.nn.deform_conv2d import DeformablePatchMerging, DeformConv2dPack
from tokenmix.nn.gnconv import GlobalLocalFilter, GnConv, LayerNorm2d
from tokenmix.nn.shift import AxialShift, CycleFC, HireMLP, PermutedBlock, RaftTokenMixer
from tokenmix.nn.window_attention import GlobalWindowAttention, RelPosBias, WindowAttention

__all__ = ["WindowAttention", "GlobalWindowAttention", "RelPosBias", "DeformConv2dPack",
           "DeformablePatchMerging", "GnConv", "GlobalLocalFilter", "LayerNorm2d", "HireMLP", "CycleFC",
           "AxialShift", "PermutedBlock", "RaftTokenMixer"]
