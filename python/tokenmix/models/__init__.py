"""Reference backbones: the official architectures, configurations and state_dict key names, with
their token mixers running on tokenmix ops (``fused=True``) or on the official eager computation
(``fused=False``; same parameters). Random weights only: nothing is downloaded.

    import tokenmix.models
    model = tokenmix.models.create("hire_mlp_tiny", fused=True, num_classes=1000)
    tokenmix.models.list_models()        # ["hire_mlp_tiny", ...]
    timm.create_model("hire_mlp_tiny")   # registered in timm's registry on import, if timm is installed

A model module adds its entry points with :func:`register`; this package imports each model
module once, then registers every entry point with timm.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from torch import Tensor, nn

__all__ = ["create", "list_models", "register", "build", "Backbone"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


class Backbone(nn.Module):
    """timm's classifier interface for a backbone with ``head``, ``num_features`` and
    ``num_classes``, and ``forward = forward_head(forward_features(x))``; subclasses define those
    two."""

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add a model entry point ``fn(pretrained=False, *, fused=True, **kwargs)`` under its
    ``__name__``."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    """The names :func:`create` accepts, sorted."""
    return sorted(_MODELS)


def create(name: str, fused: bool = True, **kwargs: Any) -> nn.Module:
    """The model ``name`` with random weights. ``fused=False`` runs every token mixer through the
    official eager formulation; other keyword arguments go to the model's constructor
    (``num_classes``, ``drop_path_rate``, ...). ``KeyError`` naming the known models otherwise."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    return fn(fused=fused, **kwargs)


# What timm passes an entry point for its own bookkeeping (and HorNet's checkpoint flag): no
# constructor takes them.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "in_22k")


def build(name: str, cls: Callable[..., nn.Module], pretrained: bool, config: dict, kwargs: dict,
          default_cfg: dict) -> nn.Module:
    """What every entry point returns: ``cls(**config, **kwargs)`` with timm's bookkeeping
    arguments dropped, ``device`` / ``dtype`` applied and timm's ``default_cfg`` set. Random weights
    only: ``pretrained=True`` raises, nothing is ever downloaded."""
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are available (tokenmix builds random weights only)")
    for k in _TIMM_ONLY:
        kwargs.pop(k, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = cls(**config, **kwargs)
    model.default_cfg = model.pretrained_cfg = dict(default_cfg, architecture=name)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _register_with_timm() -> None:
    """Put every entry point in timm's model registry, unless timm is missing (an optional
    dependency) or already has the name (a re-import of this package, or another registration of
    ours): timm warns on overwriting, and an existing name stays what it is."""
    try:
        from timm.models import is_model, register_model
    except Exception:  # not installed, or broken by a torchvision built for another torch
        return
    for name, fn in _MODELS.items():
        if not is_model(name):
            register_model(fn)


from tokenmix.models import hire_mlp as _hire_mlp  # noqa: E402,F401  (registers its models)
from tokenmix.models import hornet as _hornet  # noqa: E402,F401  (registers its models)

_register_with_timm()
