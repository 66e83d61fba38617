"""Argument normalisation shared by the op wrappers (and the modules built on them), written so
that TorchScript compiles it."""
from __future__ import annotations

from typing import List, Tuple, Union

__all__ = ["IntPair", "pair"]

# An int (both dimensions) or an (h, w) pair. Concrete types rather than Sequence[int], which
# TorchScript cannot resolve; eager mode still takes any sequence of two ints.
IntPair = Union[int, Tuple[int, int], List[int]]


def pair(v: IntPair) -> List[int]:
    """``[v, v]`` for an int, ``[v[0], v[1]]`` for a pair."""
    if isinstance(v, int):
        return [v, v]
    # TorchScript indexes only a refined type, hence a branch for lists apart from tuples.
    if isinstance(v, list):
        return [int(v[0]), int(v[1])]
    return [int(v[0]), int(v[1])]
