"""What a sample is: small arguments of one op (or a module and its inputs), keyed by name.

``torch.library.opcheck``, the ``torch.compile`` tests and ``python -m tokenmix check`` draw them
through :mod:`tokenmix.registry`. Each family's builders live beside its benchmark cases
(``tokenmix.bench.<family>``: ``<op>_samples(device, dtype)``), so a new family brings its inputs
in one file. A builder returns the op's samples in the given dtype, drawn from a fixed seed in
fp32 on the CPU and then converted: the same values (rounded) on every device and in every dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Literal, Tuple

import torch
from torch import Tensor, nn


__all__ = ["Sample", "SampleKind", "ModuleSample", "Draw", "seeded"]

# "basic": opcheck, compile and the accuracy check; "mixed": inputs that keep their own dtypes (an
# fp32 parameter beside bf16 activations), for opcheck and compile only, since the accuracy check
# runs every input in one dtype; "kernel": a shape that reaches a particular kernel path (tensor
# cores, CUTLASS, a strip kernel, a partial tile), for the accuracy check only: opcheck and
# compile see the same schema and fake kernel as with the basic samples.
SampleKind = Literal["basic", "mixed", "kernel"]


@dataclass(frozen=True)
class Sample:
    """One call of a raw op: ``torch.ops.tokenmix.<op>.default(*args, **kwargs)``.

    ``args`` follow the op's schema, which the ``tokenmix.ops`` wrapper and the oracle in
    ``tokenmix.reference`` also take positionally.
    """

    name: str
    op: str
    args: Tuple[Any, ...]
    kwargs: dict = field(default_factory=dict)
    kind: SampleKind = "basic"

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The raw op (``torch.ops.tokenmix.<op>.default``)."""
        return getattr(torch.ops.tokenmix, self.op).default

    def arg_names(self) -> List[str]:
        """The schema's name of every positional argument, for naming gradients in reports."""
        return [a.name for a in self.overload._schema.arguments][:len(self.args)]


@dataclass(frozen=True)
class ModuleSample:
    """A ``tokenmix.nn`` module (fp32, on the CPU, seeded) and its inputs; the accuracy check
    passes the parameters beside the inputs through ``torch.func.functional_call``."""

    name: str
    module: nn.Module
    inputs: Tuple[Tensor, ...]
    input_names: Tuple[str, ...]


class Draw:
    """Seeded fp32 draws on the CPU, converted to (device, dtype) on request."""

    def __init__(self, device: str, dtype: torch.dtype, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype = device, dtype

    def to(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return t.to(self.device, dtype or self.dtype)

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
        return self.to(scale * torch.randn(*shape, generator=self.gen), dtype)

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return self.to(torch.rand(*shape, generator=self.gen), dtype)

    def index(self, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen, dtype=dtype).to(self.device)

    def unique_index(self, rows: int, high: int, k: int) -> Tensor:
        return torch.stack([torch.randperm(high, generator=self.gen)[:k] for _ in range(rows)]).to(self.device)


def seeded(build: Callable[[], nn.Module]) -> nn.Module:
    # Module constructors draw from the global generator; a forked one leaves the caller's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return build()
