"""Exception types raised by the ``tokenmix.ops`` wrappers.

The C++ argument checks raise the precise Python type of the mistake: ``ValueError`` for a wrong
shape, rank, size, device or value, ``TypeError`` for a wrong dtype, ``IndexError`` for an index
out of range. torch and torchvision raise ``RuntimeError`` for the same mistakes, so code written
for them (``except RuntimeError:``) would miss ours. Every class here therefore derives from both
the precise type and ``RuntimeError`` (through :class:`TokenmixError`): an ``except ValueError:``
and an ``except RuntimeError:`` clause both catch it. The message is the C++ check's, unchanged.

Inside TorchScript the interpreter already reports every failing op as a ``RuntimeError``; under
``torch.compile`` the op is called directly, so that tracing sees no exception handling.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Type

import torch

__all__ = ["TokenmixError", "TokenmixValueError", "TokenmixTypeError", "TokenmixIndexError"]


class TokenmixError(RuntimeError):
    """Base of every error a ``tokenmix.ops`` wrapper raises for a bad argument; a
    ``RuntimeError``, as torch and torchvision raise for the same mistakes."""


class TokenmixValueError(TokenmixError, ValueError):
    """A wrong shape, rank, size, device or argument value. Both a ``ValueError`` (the precise
    type the C++ check raises) and a ``RuntimeError`` (what torchvision raises)."""


class TokenmixTypeError(TokenmixError, TypeError):
    """A wrong dtype. Both a ``TypeError`` (the precise type the C++ check raises) and a
    ``RuntimeError`` (what torch and torchvision raise)."""


class TokenmixIndexError(TokenmixError, IndexError):
    """An index outside its range. Both an ``IndexError`` (the precise type the C++ check raises)
    and a ``RuntimeError`` (what torch raises for an out-of-range gather index)."""


# Exact types only: a subclass of ValueError (say) carries its own meaning, which replacing it by
# one of ours would lose for an `except ThatSubclass:` clause.
_CONVERTED: Dict[Type[BaseException], Type[TokenmixError]] = {
    ValueError: TokenmixValueError,
    TypeError: TokenmixTypeError,
    IndexError: TokenmixIndexError,
}


@torch.jit.unused
def call_op(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)``, its ``ValueError`` / ``TypeError`` / ``IndexError`` re-raised as the
    matching :class:`TokenmixError` with the same message and traceback.

    Eager mode only: TorchScript cannot compile ``try`` (hence ``@torch.jit.unused``; the wrappers
    call the op directly when scripting), and ``torch.compile`` should trace the bare op.
    """
    try:
        return op(*args, **kwargs)
    except (ValueError, TypeError, IndexError) as exc:
        cls = _CONVERTED.get(type(exc))
        if cls is None:
            raise
        converted = cls(*exc.args)
        if hasattr(exc, "__notes__"):
            converted.__notes__ = list(exc.__notes__)
        # The C++ error is the whole story: chaining it would print the same message twice.
        raise converted.with_traceback(exc.__traceback__) from None
