"""``python -m tokenmix check``: every op (and module) against its oracle on this machine.

For each op of :mod:`tokenmix.registry`, each of its samples (``basic`` and ``kernel`` kinds) and
each dtype the op supports on the device (or the one asked for), the op's outputs and the
gradient of every floating input are held to the accuracy rule of :mod:`tokenmix.testing`: the
error against the oracle run in fp64 on the CPU may be at most twice the eager oracle's own error
in that dtype on the device, with a per-dtype floor. Every comparison is one row of the report;
a row starts with ``ok`` or ``FAIL`` so that logs can be counted with grep. The exit status is 1
when any row fails (an exception while running a sample is a failed row too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, TextIO, Tuple

import torch

from tokenmix import registry
from tokenmix.registry import ModuleSpec, OpSpec
from tokenmix.samples import Sample
from tokenmix.testing import Comparison, compare_with_oracle, module_functions

__all__ = ["Row", "select", "check_op", "check_module", "run", "format_row", "summary", "HEADER"]

# The oracle's fp64 run happens on the CPU whatever the device: independent of the kernels and
# libraries under test, and the same reference for every device.
EXACT_DEVICE = "cpu"


@dataclass(frozen=True)
class Row:
    """One line of the report: an output or gradient of one op (or module) on one sample in one
    dtype, with its verdict."""

    target: str
    sample: str
    comparison: Comparison

    @property
    def ok(self) -> bool:
        return self.comparison.ok


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3e}"


HEADER = (f"{'status':<7}{'op / module':<24}{'sample':<32}{'dtype':<10}{'result':<26}"
          f"{'max error':>11}{'bound':>11}{'eager error':>13}")


def format_row(row: Row) -> str:
    """The report's line for `row`: status, target, sample, dtype, what, error, bound, eager
    error, and a note when there is one."""
    c = row.comparison
    line = (f"{'ok' if c.ok else 'FAIL':<7}{row.target:<24}{row.sample:<32}{_dtype_name(c.dtype):<10}"
            f"{c.what:<26}{_fmt(c.error):>11}{_fmt(c.bound):>11}{_fmt(c.eager_error):>13}")
    return f"{line}  {c.note}" if c.note else line


def _failure(what: str, dtype: torch.dtype, exc: BaseException) -> Comparison:
    """A failed row for an exception, its message cut to its first line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return Comparison(what, dtype, False, note=f"{type(exc).__name__}: {first}")


def _compare(target: str, sample: str, dtype: torch.dtype, fused: Callable, oracle: Callable,
             inputs: Sequence, names: Sequence[str]) -> List[Row]:
    try:
        results = compare_with_oracle(fused, oracle, inputs, dtype, names=names, exact_device=EXACT_DEVICE)
    except Exception as exc:  # reported as a failed row, so that one broken op does not hide the rest
        results = [_failure("run", dtype, exc)]
    return [Row(target, sample, c) for c in results]


def _with_kwargs(fn: Callable, kwargs: dict) -> Callable:
    return lambda *args: fn(*args, **kwargs)


def check_op(spec: OpSpec, device: str, dtypes: Sequence[torch.dtype]) -> List[Row]:
    """Rows for every ``basic`` and ``kernel`` sample of the op, in each of `dtypes`."""
    oracle, fused = spec.load_oracle(), spec.fused()
    rows: List[Row] = []
    for dtype in dtypes:
        try:
            samples: List[Sample] = [s for s in spec.make_samples(device, dtype) if s.kind != "mixed"]
        except Exception as exc:
            rows.append(Row(spec.name, "(building samples)", _failure("samples", dtype, exc)))
            continue
        for s in samples:
            rows += _compare(spec.name, s.name, dtype, _with_kwargs(fused, s.kwargs),
                             _with_kwargs(oracle, s.kwargs), list(s.args), s.arg_names())
    return rows


def check_module(spec: ModuleSpec, device: str, dtypes: Sequence[torch.dtype]) -> List[Row]:
    """Rows for the module's sample in each of `dtypes`: its output and the gradients of its
    inputs and of every parameter, the parameters passed through ``functional_call``."""
    forward = spec.load_oracle()
    rows: List[Row] = []
    for dtype in dtypes:
        try:
            ms = spec.make()
        except Exception as exc:
            rows.append(Row(spec.name, "(building module)", _failure("module", dtype, exc)))
            continue
        # Buffers (BatchNorm's running statistics) must share the inputs' device and dtype; the
        # parameters are passed beside the inputs.
        mod = ms.module.to(device, dtype)
        fused, oracle, names = module_functions(mod, forward, len(ms.inputs))
        inputs = ([t.to(device, dtype) for t in ms.inputs]
                  + [p.detach().to(device, dtype) for p in mod.parameters()])
        rows += _compare(spec.name, ms.name, dtype, fused, oracle, inputs, list(ms.input_names) + names)
    return rows


def select(names: Optional[Iterable[str]]) -> Tuple[List[OpSpec], List[ModuleSpec]]:
    """The ops and modules to check: every one for no names; otherwise the named ops and families
    (:func:`tokenmix.registry.select`) with the modules built on them, and the named modules.

    Raises:
        ValueError: a name that is none of these.
    """
    names = list(names or ())
    if not names:
        return list(registry.OPS.values()), list(registry.MODULES.values())
    module_names = {n for n in names if n in registry.MODULES}
    others = [n for n in names if n not in registry.MODULES]
    try:
        ops = registry.select(others) if others else []
    except ValueError:
        known = sorted(set(registry.OPS) | set(registry.FAMILIES) | set(registry.MODULES))
        unknown = sorted(set(others) - set(registry.OPS) - set(registry.FAMILIES))
        raise ValueError(f"unknown op(s) {unknown}; choose from {known}") from None
    chosen = {o.name for o in ops}
    modules = [m for m in registry.MODULES.values() if m.name in module_names or chosen & set(m.ops)]
    return ops, modules


def run(names: Optional[Iterable[str]] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None,
        modules: bool = True, out: Optional[TextIO] = None, failures_only: bool = False) -> List[Row]:
    """Check the selected ops (and their modules) on `device`, in `dtype` or else in every dtype
    each supports there; print each row to `out` as it is computed (only the failing ones with
    `failures_only`), and return all rows."""
    ops, mods = select(names)
    rows: List[Row] = []

    def emit(new: List[Row]) -> None:
        rows.extend(new)
        if out is not None:
            for r in new:
                if not (failures_only and r.ok):
                    print(format_row(r), file=out, flush=True)

    for spec in ops:
        emit(check_op(spec, device, [dtype] if dtype is not None else spec.dtypes[device]))
    if modules:
        for m in mods:
            dtypes = [dtype] if dtype is not None else registry.DTYPES[device]
            emit(check_module(m, device, dtypes))
    return rows


def summary(rows: Sequence[Row]) -> str:
    """``N comparisons: n ok, m failed`` and, when some failed, which targets and dtypes."""
    failed = [r for r in rows if not r.ok]
    line = f"check: {len(rows)} comparisons, {len(rows) - len(failed)} ok, {len(failed)} failed"
    if failed:
        where = dict.fromkeys(f"{r.target} ({_dtype_name(r.comparison.dtype)})" for r in failed)
        line += "\nfailed: " + ", ".join(where)
    return line
