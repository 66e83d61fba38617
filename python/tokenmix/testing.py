"""The accuracy rule every op is held to (docs/api.md, "Testing"), shared by the test suite and
``python -m tokenmix check``.

A fused op run in some dtype is compared with its oracle run in fp64 (exact) and with the same
oracle run in that dtype (eager). Its maximum error against exact may be at most ``TOL_FACTOR``
times the eager oracle's own maximum error, with a per-dtype floor ``atol + rtol * max|exact|``
for the cases where eager happens to be exact. Integer outputs must match exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["TOL_FLOOR", "TOL_FACTOR", "Comparison", "compare_to_exact", "assert_close_to_exact",
           "clone_inputs", "compare_with_oracle", "check_against_oracle", "module_functions", "grad_leaves"]

# (rtol, atol) floors per dtype, and how much worse than the eager oracle a fused op may be.
TOL_FLOOR = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-6, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}
TOL_FACTOR = 2.0


@dataclass(frozen=True)
class Comparison:
    """One output or gradient held to the rule. ``error``, ``bound`` and ``eager_error`` are
    maxima over the elements (``None`` where they do not apply, e.g. a failure before any number);
    ``note`` says why a comparison failed without numbers, or that it was exact by rule."""

    what: str
    dtype: torch.dtype
    ok: bool
    error: Optional[float] = None
    bound: Optional[float] = None
    eager_error: Optional[float] = None
    note: str = ""

    def message(self) -> str:
        """The sentence an assertion raises with."""
        if self.note:
            return f"{self.what}: {self.note}"
        return (f"{self.what} ({self.dtype}): max error {self.error:.3e} > bound {self.bound:.3e} "
                f"(eager error {self.eager_error})")


def compare_to_exact(actual: Tensor, eager: Optional[Tensor], exact: Tensor, dtype: torch.dtype,
                     what: str) -> Comparison:
    """``max|actual - exact| <= max(TOL_FACTOR * max|eager - exact|, atol + rtol * max|exact|)``
    with ``(rtol, atol) = TOL_FLOOR[dtype]``; without ``eager`` the floor alone. NaN in ``actual``
    counts as an infinite error. Tensors may live on different devices."""
    if actual.shape != exact.shape:
        return Comparison(what, dtype, False, note=f"shape {tuple(actual.shape)} != {tuple(exact.shape)}")
    exact = exact.double().cpu()
    err = (actual.double().cpu() - exact).abs().nan_to_num(nan=float("inf")).max().item() if exact.numel() else 0.0
    rtol, atol = TOL_FLOOR[dtype]
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = atol + rtol * scale
    eager_err = None
    if eager is not None and exact.numel():
        eager_err = (eager.double().cpu() - exact).abs().max().item()
        bound = max(bound, TOL_FACTOR * eager_err)
    return Comparison(what, dtype, err <= bound, err, bound, eager_err)


def assert_close_to_exact(actual: Tensor, eager: Optional[Tensor], exact: Tensor, dtype: torch.dtype,
                          what: str) -> None:
    """:func:`compare_to_exact`, raising ``AssertionError`` when the rule does not hold."""
    c = compare_to_exact(actual, eager, exact, dtype, what)
    assert c.ok, c.message()


def clone_inputs(inputs: Sequence, dtype: Optional[torch.dtype], requires_grad: bool,
                 device: Optional[torch.device | str] = None) -> list:
    """Detached copies of the floating tensors (also inside lists), in ``dtype`` if given (else
    their own) and on ``device`` if given (else their own); other arguments as they are, except
    that tensors follow ``device``."""
    out: list = []
    for t in inputs:
        if isinstance(t, list):
            out.append(clone_inputs(t, dtype, requires_grad, device))
        elif isinstance(t, Tensor) and t.is_floating_point():
            u = t.detach().to(device=device or t.device, dtype=dtype or t.dtype, copy=True)
            out.append(u.requires_grad_(requires_grad))
        elif isinstance(t, Tensor) and device is not None:
            out.append(t.to(device))
        else:
            out.append(t)
    return out


def grad_leaves(inputs: Sequence, names: Optional[Sequence[str]]) -> tuple[list, list]:
    """The tensors that require grad, lists flattened, and a name for each: ``names[i]`` (with
    ``[j]`` for list members), or ``input i`` / ``input i[j]`` without names."""
    leaves, labels = [], []
    for i, a in enumerate(inputs):
        base = names[i] if names is not None and i < len(names) else f"input {i}"
        items = [(f"{base}[{j}]", t) for j, t in enumerate(a)] if isinstance(a, list) else [(base, a)]
        for label, t in items:
            if isinstance(t, Tensor) and t.requires_grad:
                leaves.append(t)
                labels.append(label)
    return leaves, labels


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _grads(outs: list, leaves: list, grad_outs: list) -> list:
    float_outs = [o for o in outs if o.is_floating_point()]
    if not leaves:
        return []
    gos = [g.to(o.device, o.dtype) for g, o in zip(grad_outs, float_outs)]
    return list(torch.autograd.grad(float_outs, leaves, gos, allow_unused=True))


def compare_with_oracle(fused: Callable, oracle: Callable, inputs: Sequence, dtype: torch.dtype, *,
                        names: Optional[Sequence[str]] = None, exact_device: Optional[torch.device | str] = None,
                        seed: int = 0) -> List[Comparison]:
    """Every output of ``fused`` and the gradient of every floating input (list members too),
    ``fused`` run in ``dtype``, against the oracle run in ``dtype`` (eager) and in fp64 (exact;
    on ``exact_device`` if given, e.g. the CPU for a CUDA op). The gradients flow back from
    seeded random output gradients. Returns one :class:`Comparison` per output and gradient;
    exceptions from either function propagate.

    ``names`` labels the inputs (``grad x`` instead of ``grad of input 0``).
    """
    exact_in = clone_inputs(inputs, torch.float64, True, exact_device)
    exact_outs = _outputs(oracle(*exact_in))
    gen = torch.Generator().manual_seed(seed)
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64)
                 for o in exact_outs if o.is_floating_point()]
    exact_leaves, labels = grad_leaves(exact_in, names)
    exact_grads = _grads(exact_outs, exact_leaves, grad_outs)

    def run(fn: Callable) -> tuple[list, list]:
        ins = clone_inputs(inputs, dtype, True)
        outs = _outputs(fn(*ins))
        return outs, _grads(outs, grad_leaves(ins, names)[0], grad_outs)

    eager_outs, eager_grads = run(oracle)
    fused_outs, fused_grads = run(fused)
    results: List[Comparison] = []
    if len(fused_outs) != len(exact_outs):
        return [Comparison("outputs", dtype, False,
                           note=f"{len(fused_outs)} outputs, the oracle has {len(exact_outs)}")]
    for i, (f, e, x) in enumerate(zip(fused_outs, eager_outs, exact_outs)):
        what = f"output {i}"
        if not x.is_floating_point():
            same = f.dtype == x.dtype and f.shape == x.shape and torch.equal(f.cpu(), x.cpu())
            results.append(Comparison(what, dtype, same, note="" if same else "differs",
                                      error=0.0 if same else None, bound=0.0 if same else None))
        elif f.dtype != dtype:
            results.append(Comparison(what, dtype, False, note=f"dtype {f.dtype} != {dtype}"))
        else:
            results.append(compare_to_exact(f, e, x, dtype, what))
    for f, e, x, label in zip(fused_grads, eager_grads, exact_grads, labels):
        what = f"grad {label}" if names is not None else f"grad of {label}"
        if x is None:
            if f is not None and f.abs().any():
                results.append(Comparison(what, dtype, False, note="fused has a gradient the oracle lacks"))
            continue
        if f is None:
            results.append(Comparison(what, dtype, False, note="missing"))
        elif f.dtype != dtype:
            results.append(Comparison(what, dtype, False, note=f"dtype {f.dtype} != {dtype}"))
        else:
            results.append(compare_to_exact(f, e, x, dtype, what))
    return results


def check_against_oracle(fused: Callable, oracle: Callable, inputs: Sequence, dtype: torch.dtype,
                         seed: int = 0) -> None:
    """:func:`compare_with_oracle`, raising ``AssertionError`` at the first comparison that
    fails."""
    for c in compare_with_oracle(fused, oracle, inputs, dtype, seed=seed):
        assert c.ok, c.message()


def module_functions(mod: torch.nn.Module, oracle_forward: Callable, n_inputs: int
                     ) -> Tuple[Callable, Callable, List[str]]:
    """A module and the oracle of its computation as functions of ``(*inputs, *parameters)``,
    so the comparisons above take gradients of the parameters like of any input.

    ``oracle_forward(mod, params, *inputs)`` computes what `mod` computes with the parameters in
    ``params`` (a name -> tensor dict); the fused side runs `mod` itself through
    ``torch.func.functional_call``. Returns ``(fused, oracle, parameter names)``.
    """
    from torch.func import functional_call

    names = [n for n, _ in mod.named_parameters()]

    def fused(*args):
        return functional_call(mod, dict(zip(names, args[n_inputs:])), tuple(args[:n_inputs]))

    def oracle(*args):
        return oracle_forward(mod, dict(zip(names, args[n_inputs:])), *args[:n_inputs])

    return fused, oracle, names
