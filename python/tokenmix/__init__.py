"""tokenmix: fused C++/CUDA token-mixer operators for vision backbones, as PyTorch custom ops.

``tokenmix.ops`` holds the functional API (``torch.ops.tokenmix.*`` underneath), ``tokenmix.nn``
the modules, ``tokenmix.registry`` one entry per op (what every list of ops derives from),
``tokenmix.reference`` the eager oracles every op is tested against (imported on first use), and
``python -m tokenmix`` the command line (info, check, bench, demo, ops).
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from tokenmix import _C  # registers torch.ops.tokenmix.*
from tokenmix import errors, nn, ops, registry
from tokenmix.accelerate import accelerate

__version__: str = _C.version

__all__ = ["ops", "nn", "reference", "registry", "errors", "accelerate", "info", "OPS", "__version__"]

# Public ops and the family each belongs to, in the order the README's op table lists them.
OPS: dict[str, str] = {name: spec.family for name, spec in registry.OPS.items()}


def __getattr__(name: str) -> Any:
    # The oracles are what the library is tested against, so the library does not import them;
    # `tokenmix.reference` still works as an attribute, importing them on first use.
    if name == "reference":
        return importlib.import_module("tokenmix.reference")
    raise AttributeError(f"module 'tokenmix' has no attribute {name!r}")


def info() -> dict:
    """What this build of tokenmix contains: version, torch, backends and per-op kernels."""
    return {
        "tokenmix": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_capability": _C.cpu_capability,
        "cuda_compiled": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(",") if a],
        "cutlass": bool(_C.with_cutlass),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": {
            name: {"family": spec.family, "cpu": spec.has_kernel("CPU"), "cuda": spec.has_kernel("CUDA"),
                   "autograd": spec.has_kernel("Autograd")}
            for name, spec in registry.OPS.items()
        },
    }
