"""``tokenmix.accelerate(model)``: swap the token mixers of supported timm models for fused
tokenmix modules that share the same parameters (state_dict keys unchanged).

Supported: timm Swin v1 blocks (``SwinTransformerBlock``) and GC ViT blocks
(``GlobalContextVitBlock``). Each accelerated block keeps its class's behaviour except its window
attention step, which becomes one fused op; the block's class is replaced by a subclass, so
``isinstance`` checks and the state_dict still hold. Anything else is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from tokenmix.nn.window_attention import GlobalWindowAttention, WindowAttention

# FusedSwinTransformerBlock and FusedGlobalContextVitBlock are importable from here too, but are
# left out of __all__: naming them builds them, which imports timm.
__all__ = ["accelerate", "Replacement", "TimmSwinWindowAttention"]


@dataclass
class Replacement:
    name: str
    kind: str
    replaced: bool
    reason: str


class TimmSwinWindowAttention(WindowAttention):
    """:class:`~tokenmix.nn.WindowAttention` whose bias table follows a window change the way
    timm's Swin ``WindowAttention.set_window_size`` resamples it, so that ``set_input_size`` gives
    an accelerated model the parameters the plain timm model gets."""

    def resize_bias_table(self, table: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
        from timm.layers import resize_rel_pos_bias_table

        shape = ((2 * new[0] - 1) * (2 * new[1] - 1), table.shape[1])
        # timm infers a square source window from the table; only a non-square one needs naming,
        # and timm releases that cannot take the name cannot resize such tables either.
        extra = {} if old[0] == old[1] else {"old_window_size": old}
        return resize_rel_pos_bias_table(table, new_window_size=new, new_bias_shape=shape, **extra)


def _build_swin_block() -> type:
    from timm.models.swin_transformer import SwinTransformerBlock

    class FusedSwinTransformerBlock(SwinTransformerBlock):
        """timm's ``SwinTransformerBlock`` whose attention step (shift, padding, partition, masked
        window attention, merge) is one :class:`TimmSwinWindowAttention` call."""

        def _attn(self, x: Tensor) -> Tensor:
            return self.attn(x)

        def set_input_size(self, *args: Any, **kwargs: Any) -> None:
            """timm's ``set_input_size``; the fused attention then takes the block's new window
            and shift (timm resizes the bias table through ``attn.set_window_size``)."""
            super().set_input_size(*args, **kwargs)
            self.attn.set_window_size(self.window_size, self.shift_size)

    return FusedSwinTransformerBlock


def _build_gcvit_block() -> type:
    from timm.models.gcvit import GlobalContextVitBlock

    class FusedGlobalContextVitBlock(GlobalContextVitBlock):
        """timm's ``GlobalContextVitBlock`` whose window attention (partition, attention, merge)
        is one :class:`~tokenmix.nn.GlobalWindowAttention` call."""

        def _window_attn(self, x: Tensor, q_global: Optional[Tensor] = None) -> Tensor:
            return self.attn(x, q_global)

    return FusedGlobalContextVitBlock


_FUSED_BUILDERS: dict[str, Callable[[], type]] = {
    "FusedSwinTransformerBlock": _build_swin_block,
    "FusedGlobalContextVitBlock": _build_gcvit_block,
}


def __getattr__(name: str) -> type:
    """The fused block classes subclass timm's, so they are built on first use (importing tokenmix
    does not import timm). They live here under their own names, which is where pickle, torch.save
    and torch.load look them up."""
    build = _FUSED_BUILDERS.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = build()
    cls.__qualname__ = name
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def _fused_class(name: str) -> type:
    return globals().get(name) or __getattr__(name)


def _is_fused(module: nn.Module) -> bool:
    return any(type(module) is globals().get(name) for name in _FUSED_BUILDERS)


def _share(dst: nn.Module, src: nn.Module, names: list[str]) -> None:
    for n in names:
        setattr(dst, n, getattr(src, n))


def _accelerate_swin(block) -> str | None:
    attn = block.attn
    if attn.attn_drop.p > 0 and block.training:
        return "attention dropout is not fused"
    if type(attn).__name__ != "WindowAttention":
        return f"unknown attention {type(attn).__name__}"
    fused = TimmSwinWindowAttention(attn.dim, attn.num_heads, window_size=tuple(block.window_size),
                                    shift_size=tuple(block.shift_size),
                                    head_dim=attn.qkv.out_features // (3 * attn.num_heads))
    _share(fused, attn, ["qkv", "proj", "proj_drop", "relative_position_bias_table"])
    fused.scale = attn.scale
    block.attn = fused
    block.__class__ = _fused_class("FusedSwinTransformerBlock")
    return None


def _global_queries_per_image(attn: nn.Module) -> bool:
    """Whether `attn` (a timm ``WindowAttentionGlobal``) gives every window of image b the global
    query of image b, GC ViT's math. Older timm releases tiled the queries across the batch, so
    window w got the query of image w % B and images mixed; the fused op does not reproduce that,
    and such blocks are left alone.

    Found by running `attn` on two images of two windows each and changing only the second image's
    query: the first image's windows must not see it. Without such evidence (the probe does not
    run, or the weights hide the query), per-image queries are assumed.
    """
    wh, ww = attn.window_size
    dim = attn.proj.in_features
    weight = attn.proj.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, wh * ww, dim, generator=gen).to(weight.device, weight.dtype)
    q = torch.randn(2, wh, ww, dim, generator=gen).to(weight.device, weight.dtype)
    q_other = q.clone()
    q_other[1] += 1
    was_training = attn.training
    try:
        attn.eval()
        with torch.no_grad():
            return bool(torch.equal(attn(x, q)[:2], attn(x, q_other)[:2]))
    except Exception:
        return True
    finally:
        attn.train(was_training)


def _accelerate_gcvit(block) -> str | None:
    attn = block.attn
    if attn.attn_drop.p > 0 and block.training:
        return "attention dropout is not fused"
    if attn.use_global and not _global_queries_per_image(attn):
        return "this timm tiles global queries across images (images mix); not fused"
    H, W = block.window_size
    fused = GlobalWindowAttention(attn.proj.in_features, attn.num_heads, (H, W),
                                  use_global=attn.use_global, qkv_bias=attn.qkv.bias is not None)
    _share(fused, attn, ["qkv", "proj", "proj_drop", "rel_pos"])
    fused.scale = attn.scale
    block.attn = fused
    block.__class__ = _fused_class("FusedGlobalContextVitBlock")
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
        if _is_fused(module):
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
