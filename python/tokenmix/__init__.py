"""tokenmix: fused C++/CUDA token-mixer operators for vision backbones, as PyTorch custom ops.

``tokenmix.ops`` holds the functional API (``torch.ops.tokenmix.*`` underneath),
``tokenmix.reference`` the eager oracles every op is tested against, and ``python -m tokenmix``
the command line (info, bench, demo).
"""
from __future__ import annotations

import torch

from tokenmix import _C  # registers torch.ops.tokenmix.*
from tokenmix import errors, nn, ops, reference
from tokenmix.accelerate import accelerate

__version__: str = _C.version

__all__ = ["ops", "nn", "reference", "errors", "accelerate", "info", "__version__"]

# Public ops and the family each belongs to, in the order the README's op table lists them.
OPS: dict[str, str] = {
    "gather_tokens": "gather",
    "scatter_tokens": "gather",
    "topk_tokens": "gather",
    "policy_softmax": "gather",
    "window_attention": "window_attention",
    "deform_conv2d": "deform_conv2d",
    "gnconv": "gnconv",
}


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenmix::{op}", key)


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
            op: {"family": fam, "cpu": _has_kernel(op, "CPU"), "cuda": _has_kernel(op, "CUDA"),
                 "autograd": _has_kernel(op, "Autograd")}
            for op, fam in OPS.items()
        },
    }
