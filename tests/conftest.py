"""Shared test harness: devices, dtypes, tolerances and the checks every op family reuses.

Accuracy rule (docs/api.md, "Testing"): a fused op is compared with its eager oracle *and* with the oracle run in
fp64. Its error against fp64 may be at most TOL_FACTOR times what the eager oracle itself loses in
the same dtype, with a floor (atol + rtol * max|exact|) for cases where eager is exact by luck. The
rule lives in tokenmix.testing, which `python -m tokenmix check` applies too.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

import tokenmix  # noqa: F401  (registers the ops)
from tokenmix import registry
from tokenmix.testing import (TOL_FACTOR, TOL_FLOOR, assert_close_to_exact, check_against_oracle, clone_inputs,
                              grad_leaves)

__all__ = ["HAS_CUDA", "DEVICES", "DTYPES", "TOL_FLOOR", "TOL_FACTOR", "AUTOCAST", "device_dtype_params",
           "assert_close_to_exact", "check_against_oracle", "check_gradcheck", "check_opcheck",
           "check_compiles", "check_raises", "check_autocast"]

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]

# Per device: the dtypes every op supports there (docs/api.md).
DTYPES = {device: list(dtypes) for device, dtypes in registry.DTYPES.items()}


def device_dtype_params() -> list:
    """(device, dtype) pairs: every supported dtype on every device, CUDA ones marked."""
    out = []
    for dev in DEVICES:
        name = dev.values[0]
        for dt in DTYPES[name]:
            out.append(pytest.param(name, dt, id=f"{name}-{str(dt).split('.')[-1]}", marks=dev.marks))
    return out


def check_gradcheck(fn: Callable, inputs: Sequence, nondet_tol: float = 0.0) -> None:
    """fp64 torch.autograd.gradcheck on every floating input. `nondet_tol` allows two backward runs
    to differ by that much (CUDA kernels that accumulate with atomics)."""
    ins = clone_inputs(inputs, torch.float64, True)
    assert torch.autograd.gradcheck(fn, tuple(ins), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=False,
                                    nondet_tol=nondet_tol)


def check_opcheck(op, args: Sequence, kwargs: dict | None = None) -> None:
    """torch.library.opcheck: schema, autograd registration, fake tensor, AOT dispatch."""
    torch.library.opcheck(op, tuple(args), kwargs or {}, raise_exception=True)


def check_compiles(fn: Callable, inputs: Sequence, backend: str = "aot_eager") -> None:
    """torch.compile(fullgraph=True) traces fn with no graph break and matches eager, forward and
    backward."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    a = clone_inputs(inputs, None, True)
    b = clone_inputs(inputs, None, True)
    out_e = fn(*a)
    out_c = compiled(*b)
    out_e = list(out_e) if isinstance(out_e, (tuple, list)) else [out_e]
    out_c = list(out_c) if isinstance(out_c, (tuple, list)) else [out_c]
    for e, c in zip(out_e, out_c):
        torch.testing.assert_close(c, e)
    fe = [o for o in out_e if o.is_floating_point()]
    fc = [o for o in out_c if o.is_floating_point()]
    sum(o.float().sum() for o in fe).backward()
    sum(o.float().sum() for o in fc).backward()
    def leaves(args):
        return [t for a in args for t in (a if isinstance(a, list) else [a])
                if isinstance(t, torch.Tensor) and t.requires_grad]
    for x, y in zip(leaves(a), leaves(b)):
        torch.testing.assert_close(y.grad, x.grad)


def check_raises(exc: type, match: str, fn: Callable, *args, **kwargs) -> None:
    """fn(*args) raises `exc` whose message contains `match` (the argument's name)."""
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# ---- mixed precision -------------------------------------------------------------------------

# (device, autocast dtype) pairs: CPU autocast in bf16 here, CUDA AMP in fp16 and bf16.
AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=DEVICES[1].marks),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=DEVICES[1].marks),
]


def check_autocast(fused: Callable, oracle: Callable, inputs: Sequence, device: str,
                   amp_dtype: torch.dtype, out_dtypes: Sequence[torch.dtype], seed: int = 0) -> None:
    """`fused` under ``torch.autocast(device, amp_dtype)`` vs the fp64 oracle, with the accuracy
    rule of `assert_close_to_exact` at the autocast dtype's floor and relative to the error of the
    eager oracle under the same autocast. Inputs keep their own dtypes (mixed ones included);
    floating outputs must have `out_dtypes` (the op's policy), every gradient its input's dtype."""
    exact_in = clone_inputs(inputs, torch.float64, True)
    exact_outs = oracle(*exact_in)
    exact_outs = [o for o in (exact_outs if isinstance(exact_outs, (tuple, list)) else [exact_outs])
                  if o.is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in exact_outs]
    exact_grads = torch.autograd.grad(exact_outs, grad_leaves(exact_in, None)[0], grad_outs, allow_unused=True)

    def run(fn):
        ins = clone_inputs(inputs, None, True)
        with torch.autocast(device, dtype=amp_dtype):
            outs = fn(*ins)
        outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if o.is_floating_point()]
        grads = torch.autograd.grad(outs, grad_leaves(ins, None)[0], [g.to(o.dtype) for g, o in zip(grad_outs, outs)],
                                    allow_unused=True)
        return outs, grads, grad_leaves(ins, None)[0]

    eager_outs, eager_grads, _ = run(oracle)
    fused_outs, fused_grads, leaves = run(fused)
    assert [o.dtype for o in fused_outs] == list(out_dtypes), \
        f"output dtypes {[o.dtype for o in fused_outs]} != policy {list(out_dtypes)}"
    for i, (f, e, x) in enumerate(zip(fused_outs, eager_outs, exact_outs)):
        assert_close_to_exact(f, e, x, amp_dtype, f"autocast output {i}")
    for i, (f, e, x, leaf) in enumerate(zip(fused_grads, eager_grads, exact_grads, leaves)):
        if x is None:
            continue
        assert f is not None, f"grad {i}: missing"
        assert f.dtype == leaf.dtype, f"grad {i}: dtype {f.dtype} != its input's {leaf.dtype}"
        assert_close_to_exact(f, e, x, amp_dtype, f"autocast grad of input {i}")


# ---- seeded data and state_dict shapes for the backbone tests ----------------------------------

def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator at ``seed``."""
    return torch.Generator().manual_seed(seed)


def seeded_randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``torch.randn(*shape)`` from :func:`seeded` ``(seed)``, in ``dtype`` (fp64 by default)."""
    return torch.randn(*shape, generator=seeded(seed), dtype=dtype)


def assert_channels_last_matches(model: torch.nn.Module, x: torch.Tensor, classes: int) -> torch.Tensor:
    """An eval-mode model gives ``[B, classes]`` logits, and a channels_last copy of it on a
    channels_last input the same ones. Returns the contiguous logits."""
    import copy
    with torch.no_grad():
        a = model(x)
        b = copy.deepcopy(model).to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert a.shape == (x.shape[0], classes)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    return a


def state_shapes(mod: torch.nn.Module) -> dict:
    """``{key: shape}`` of a module's state_dict."""
    return {k: tuple(v.shape) for k, v in mod.state_dict().items()}
