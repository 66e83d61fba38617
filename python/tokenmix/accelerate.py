"""``tokenmix.accelerate(model)``: swap the token mixers of supported timm models for fused
tokenmix modules that share the same parameters (state_dict keys unchanged).

Supported: timm Swin v1 blocks (``SwinTransformerBlock``) and GC ViT blocks
(``GlobalContextVitBlock``). Each accelerated block keeps its class's behaviour except its window
attention step, which becomes one fused op; the block's class is replaced by a subclass, so
``isinstance`` checks and the state_dict still hold. Anything else is left alone.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from tokenmix.nn.window_attention import GlobalWindowAttention, WindowAttention

__all__ = ["accelerate", "Replacement"]


@dataclass
class Replacement:
    name: str
    kind: str
    replaced: bool
    reason: str


_SUBCLASSES: dict[type, type] = {}


def _fused_subclass(base: type, attn_step: str, body) -> type:
    """A subclass of `base` whose `attn_step` method is `body` (one class per base)."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Fused{base.__name__}", (base,), {attn_step: body,
                                                                      "__module__": __name__})
    return _SUBCLASSES[base]


def _swin_attn(self, x):
    return self.attn(x)


def _gcvit_window_attn(self, x, q_global=None):
    return self.attn(x, q_global)


def _share(dst: nn.Module, src: nn.Module, names: list[str]) -> None:
    for n in names:
        setattr(dst, n, getattr(src, n))


def _accelerate_swin(block) -> str | None:
    attn = block.attn
    if attn.attn_drop.p > 0 and block.training:
        return "attention dropout is not fused"
    if type(attn).__name__ != "WindowAttention":
        return f"unknown attention {type(attn).__name__}"
    fused = WindowAttention(attn.dim, attn.num_heads, window_size=tuple(block.window_size),
                            shift_size=tuple(block.shift_size),
                            head_dim=attn.qkv.out_features // (3 * attn.num_heads))
    _share(fused, attn, ["qkv", "proj", "proj_drop", "relative_position_bias_table"])
    fused.scale = attn.scale
    block.attn = fused
    block.__class__ = _fused_subclass(type(block), "_attn", _swin_attn)
    return None


def _queries_per_image(attn) -> bool:
    """Whether this timm's WindowAttentionGlobal gives every window of image b the query
    q_global[b] (``repeat_interleave``, GC ViT's math). Older timm releases tiled the queries with
    ``Tensor.repeat``, so window w got q_global[w % B] and images mixed; the fused op does not
    reproduce that, and such blocks are left alone."""
    try:
        source = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        return True
    return "repeat_interleave" in source or ".repeat(" not in source


def _accelerate_gcvit(block) -> str | None:
    attn = block.attn
    if attn.attn_drop.p > 0 and block.training:
        return "attention dropout is not fused"
    if attn.use_global and not _queries_per_image(attn):
        return "this timm tiles global queries with Tensor.repeat (images mix); not fused"
    H, W = block.window_size
    fused = GlobalWindowAttention(attn.proj.in_features, attn.num_heads, (H, W),
                                  use_global=attn.use_global, qkv_bias=attn.qkv.bias is not None)
    _share(fused, attn, ["qkv", "proj", "proj_drop", "rel_pos"])
    fused.scale = attn.scale
    block.attn = fused
    block.__class__ = _fused_subclass(type(block), "_window_attn", _gcvit_window_attn)
    return None


def _handlers():
    """(block class, description, handler) for each supported family timm provides here. timm
    can fail to import with errors other than ImportError (a torchvision built for another
    torch); then nothing is supported."""
    try:
        from timm.models.gcvit import GlobalContextVitBlock
        from timm.models.swin_transformer import SwinTransformerBlock
    except Exception:
        return []
    return [(SwinTransformerBlock, "Swin v1 window attention", _accelerate_swin),
            (GlobalContextVitBlock, "GC ViT window attention", _accelerate_gcvit)]


def accelerate(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replace, in place, the attention of supported timm blocks with fused tokenmix modules.

    Parameters are shared, not copied, so ``model.state_dict()`` keys and values are unchanged and
    optimizers built before the call keep working. Returns ``model``. With ``verbose=True``, prints
    what was replaced, and what was not and why. The list of decisions is also kept on
    ``model.tokenmix_report``.
    """
    handlers = _handlers()
    report: list[Replacement] = []
    for name, module in model.named_modules():
        if type(module) in _SUBCLASSES.values():
            report.append(Replacement(name, type(module).__name__, False, "already accelerated"))
            continue
        for cls, kind, handler in handlers:
            if type(module) is cls:
                why = handler(module)
                report.append(Replacement(name, kind, why is None, why or "fused"))
                break
    if not handlers:
        report.append(Replacement("", "timm", False, "timm is not importable"))
    elif not report:
        report.append(Replacement("", type(model).__name__, False, "no supported blocks found"))
    model.tokenmix_report = report
    if verbose:
        done = sum(r.replaced for r in report)
        print(f"tokenmix.accelerate: {done} of {len(report)} candidate blocks replaced")
        for r in report:
            print(f"  {'replaced' if r.replaced else 'kept    '}  {r.name or '<model>'}: {r.kind} ({r.reason})")
    return model
