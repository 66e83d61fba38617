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

import argparse
import os
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["create", "list_models", "register", "build", "load_checkpoint", "checkpoint_file", "default_cfg",
           "init_transformer_weights", "Backbone", "Mlp"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


class Backbone(nn.Module):
    """timm's classifier interface for a backbone with ``head``, ``num_features`` and
    ``num_classes``, and ``forward = forward_head(forward_features(x))``; subclasses define those
    two. Also timm's ``set_grad_checkpointing``: subclasses run their blocks through
    :meth:`run_blocks`, which recomputes each block's activations in backward when it is on."""

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_blocks(self, blocks: Iterable[nn.Module], x: Tensor, *args: Any) -> Tensor:
        """``x = block(x, *args)`` for each block in turn, each under non-reentrant activation
        checkpointing when gradient checkpointing is on and autograd records."""
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_cfg(file: str, first_conv: str, **kwargs: Any) -> dict:
    """timm's pretrained cfg of a model: ImageNet-1k at 224 x 224, bicubic, ImageNet mean and std,
    classifier ``head``, overridden by ``kwargs``. Nothing downloads (``url`` empty); ``file`` is
    the official checkpoint's file name, which ``pretrained=True`` reads locally (:func:`build`).
    A model module's ``default_cfgs`` dict of these is what timm's ``register_model`` reads."""
    return {"url": "", "file": file, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "first_conv": first_conv, "classifier": "head", **kwargs}


class Mlp(nn.Module):
    """The transformers' token MLP: ``drop(fc2(drop(gelu(fc1(x)))))``, back to ``in_features``
    (keys ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, drop: float = 0.):
        super().__init__()
        hidden = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def init_transformer_weights(m: nn.Module) -> None:
    """The transformers' official ``_init_weights`` (DeiT's, LIT's), for ``model.apply``: Linear
    weights truncated normal (std 0.02) and biases zero, LayerNorms at identity; other modules keep
    PyTorch's initialisation."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add a model entry point ``fn(pretrained=False, *, fused=True, **kwargs)`` under its
    ``__name__``."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    """The names :func:`create` accepts, sorted."""
    return sorted(_MODELS)


def create(name: str, fused: bool = True, checkpoint_path: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """The model ``name``, with random weights unless ``checkpoint_path`` names a checkpoint
    (read by :func:`load_checkpoint`) or ``pretrained=True`` (the official checkpoint file, see
    :func:`build`). ``fused=False`` runs every token mixer through the official eager formulation;
    other keyword arguments go to the model's constructor (``num_classes``, ``drop_path_rate``,
    ...). ``KeyError`` naming the known models otherwise."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    model = fn(fused=fused, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint file into ``model`` with ``strict=True`` semantics; returns ``model``.

    The file holds either a state_dict or, as the official training code saves it, a dict with the
    state_dict under ``model`` (else ``state_dict``), possibly beside an ``args`` namespace. It is
    read with ``weights_only=True`` (tensors, containers and ``argparse.Namespace``: no code
    runs). A ``module.`` prefix (a DistributedDataParallel-wrapped save) is dropped. When the
    model was built with a different ``num_classes`` than the checkpoint's, the checkpoint's
    classifier entries (under the cfg's ``classifier`` name, ``head`` by default) are skipped and
    the new classifier keeps its initialisation; every other key must
    match in name and shape (``load_state_dict``'s errors otherwise)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}
    own = model.state_dict()
    prefix = getattr(model, "pretrained_cfg", {}).get("classifier", "head") + "."
    head = [k for k in state if k.startswith(prefix)]
    if head and any(k not in own or own[k].shape != state[k].shape for k in head):
        for k in head:
            state.pop(k)
        missing, unexpected = model.load_state_dict(state, strict=False)
        left = [k for k in missing if not k.startswith(prefix)]
        if left or unexpected:
            model.load_state_dict(state, strict=True)  # raises, naming the keys
    else:
        model.load_state_dict(state, strict=True)
    return model


def checkpoint_file(name: str, file: str) -> str:
    """Where ``pretrained=True`` finds the official checkpoint ``file`` of model ``name``: the path
    as given (absolute, or relative to the current directory), else under the directory
    ``$TOKENMIX_CHECKPOINTS``. ``FileNotFoundError`` naming both otherwise: nothing is ever
    downloaded."""
    tried = [file]
    if os.path.isfile(file):
        return file
    root = os.environ.get("TOKENMIX_CHECKPOINTS")
    if root:
        path = os.path.join(root, os.path.basename(file))
        tried.append(path)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{name}: pretrained=True needs the official checkpoint file {os.path.basename(file)!r}; tried "
        f"{', '.join(map(repr, tried))}. tokenmix downloads nothing: put the file there, set "
        f"TOKENMIX_CHECKPOINTS to its directory, or pass pretrained_cfg_overlay=dict(file=PATH)")


# What timm passes an entry point for its own bookkeeping (and HorNet's checkpoint flag): no
# constructor takes them.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "in_22k")


def _cfg_file(cfg: Any) -> Optional[str]:
    """The ``file`` entry of a timm pretrained cfg (a dict or timm's PretrainedCfg), if any."""
    if isinstance(cfg, dict):
        return cfg.get("file") or None
    return getattr(cfg, "file", None) or None


def build(name: str, cls: Callable[..., nn.Module], pretrained: bool, config: dict, kwargs: dict,
          default_cfg: dict) -> nn.Module:
    """What every entry point returns: ``cls(**config, **kwargs)`` with timm's bookkeeping
    arguments dropped, ``device`` / ``dtype`` applied and timm's ``default_cfg`` set. Random
    weights, unless ``pretrained=True``: then the official checkpoint is loaded from a local file
    (:func:`load_checkpoint`), the one named by ``pretrained_cfg_overlay["file"]``, else by the
    ``file`` of timm's ``pretrained_cfg``, else the model's default cfg's (the official release's
    file name), found by :func:`checkpoint_file`. Nothing is ever downloaded."""
    file = None
    if pretrained:
        file = (_cfg_file(kwargs.get("pretrained_cfg_overlay")) or _cfg_file(kwargs.get("pretrained_cfg"))
                or default_cfg["file"])
        file = checkpoint_file(name, file)
    for k in _TIMM_ONLY:
        kwargs.pop(k, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = cls(**{**config, **kwargs})
    model.default_cfg = model.pretrained_cfg = dict(default_cfg, architecture=name)
    if file is not None:
        load_checkpoint(model, file)
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


from tokenmix.models import dynamicvit as _dynamicvit  # noqa: E402,F401  (registers its models)
from tokenmix.models import hatnet as _hatnet  # noqa: E402,F401  (registers its models)
from tokenmix.models import hire_mlp as _hire_mlp  # noqa: E402,F401  (registers its models)
from tokenmix.models import hornet as _hornet  # noqa: E402,F401  (registers its models)
from tokenmix.models import lit as _lit  # noqa: E402,F401  (registers its models)

_register_with_timm()
