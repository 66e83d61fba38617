"""Sparse-token gather family (DynamicViT): gather, scatter, top-k selection and the
training-time policy softmax, as fused ops with backward passes on CPU and CUDA."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from tokenmix.errors import call_op

__all__ = ["gather_tokens", "scatter_tokens", "topk_tokens", "policy_softmax"]

_ops = torch.ops.tokenmix


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    r"""Select tokens per batch row: ``out[b, k] = x[b, index[b, k]]``.

    Args:
        x: tokens ``[B, N, C]`` (any float dtype; strided views with a unit channel stride are
            read without a copy).
        index: ``[B, K]`` int64 with ``0 <= index < N``. Duplicates are allowed; their gradients
            add up (summed in ``k`` order, deterministically).

    Returns:
        ``[B, K, C]``, contiguous. Gradient flows to ``x``.

    Raises:
        IndexError: an entry of ``index`` outside ``[0, N)``.
        ValueError / TypeError: wrong rank, size, device or dtype (the message names the argument).
        Each is raised as its ``tokenmix.errors`` subclass, also a ``RuntimeError``.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.gather_tokens(x, index)
    return call_op(_ops.gather_tokens, x, index)


def scatter_tokens(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    r"""Replace rows of ``x``: ``out = x`` except ``out[b, index[b, k]] = src[b, k]``.

    Args:
        x: ``[B, N, C]``.
        index: ``[B, K]`` int64, ``0 <= index < N``, unique within each row.
        src: ``[B, K, C]``, same dtype and device as ``x``.

    Returns:
        A new ``[B, N, C]`` tensor (``x`` is not modified). Gradients:
        ``dx = dout`` with the replaced rows zeroed, ``dsrc[b, k] = dout[b, index[b, k]]``.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.scatter_tokens(x, index, src)
    return call_op(_ops.scatter_tokens, x, index, src)


def topk_tokens(x: Tensor, score: Tensor, k: int, keep_first: int = 0) -> Tuple[Tensor, Tensor]:
    r"""Keep the ``keep_first`` leading tokens, then the ``k`` best-scored of the rest.

    With ``M = N - keep_first``, the selected positions are
    ``[0, ..., keep_first - 1] + [keep_first + j for j in argsort(score[b], descending)[:k]]``,
    descending by score, ties broken by the lower position (NaN ranks above every number).

    Args:
        x: ``[B, N, C]``.
        score: ``[B, N - keep_first]``, any float dtype.
        k: number of scored tokens to keep, ``0 <= k <= N - keep_first``.
        keep_first: leading tokens kept unconditionally (e.g. 1 for the class token).

    Returns:
        ``(tokens [B, keep_first + k, C], index [B, keep_first + k] int64)``, ``index`` holding
        positions in ``x``. Gradient flows to ``x`` only.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.topk_tokens(x, score, k, keep_first=keep_first)
    return call_op(_ops.topk_tokens, x, score, k, keep_first=keep_first)


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    r"""DynamicViT's training-time attention softmax restricted to the kept tokens.

    For each row ``i`` of ``logits[b, h]`` with ``P = policy[b]``:

    .. math::
        m = \max_j l_{ij},\quad
        a_{ij} = e^{l_{ij} - m}\,\bigl(P_j + (1 - P_j)\,\delta_{ij}\bigr),\quad
        \mathrm{out}_{ij} = \frac{a_{ij} + \varepsilon / N}{\sum_j a_{ij} + \varepsilon}

    Reductions run in fp32 for fp16/bf16 inputs. One fused pass forward, one backward; no
    ``[B, h, N, N]`` intermediate is stored.

    Args:
        logits: ``[B, heads, N, N]``.
        policy: ``[B, N]`` with values in ``[0, 1]``, same dtype as ``logits``.
        eps: the stabiliser of the formula.

    Returns:
        ``[B, heads, N, N]``. Gradients to ``logits`` and ``policy``.
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _ops.policy_softmax(logits, policy, eps)
    return call_op(_ops.policy_softmax, logits, policy, eps)


# ---- fake (meta) kernels, for torch.compile / torch.export --------------------------------------
# Shapes, plus the device checks that the real kernels cannot see when one argument is a meta
# tensor (the dispatcher then routes the call here).


def _same_device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    torch._check_value(
        t.device == ref.device,
        lambda: f"tokenmix.{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")



@torch.library.register_fake("tokenmix::gather_tokens")
def _(x: Tensor, index: Tensor) -> Tensor:
    _same_device("gather_tokens", "index", index, "x", x)
    return x.new_empty((x.shape[0], index.shape[1], *x.shape[2:]))


@torch.library.register_fake("tokenmix::gather_tokens_backward")
def _(grad: Tensor, index: Tensor, num_tokens: int) -> Tensor:
    return grad.new_empty((grad.shape[0], num_tokens, *grad.shape[2:]))


@torch.library.register_fake("tokenmix::scatter_tokens")
def _(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    _same_device("scatter_tokens", "index", index, "x", x)
    _same_device("scatter_tokens", "src", src, "x", x)
    return x.new_empty(x.shape)


@torch.library.register_fake("tokenmix::scatter_tokens_backward")
def _(grad: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    return grad.new_empty(grad.shape), grad.new_empty((grad.shape[0], index.shape[1], grad.shape[2]))


@torch.library.register_fake("tokenmix::topk_tokens")
def _(x: Tensor, score: Tensor, k: int, *, keep_first: int = 0) -> tuple[Tensor, Tensor]:
    _same_device("topk_tokens", "score", score, "x", x)
    rows = keep_first + k
    return (x.new_empty((x.shape[0], rows, x.shape[2])),
            x.new_empty((x.shape[0], rows), dtype=torch.int64))


@torch.library.register_fake("tokenmix::policy_softmax")
def _(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    _same_device("policy_softmax", "policy", policy, "logits", logits)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("tokenmix::policy_softmax_backward")
def _(grad: Tensor, logits: Tensor, policy: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape), policy.new_empty(policy.shape)
