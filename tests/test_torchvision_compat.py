"""Drop-in compatibility of the ``tokenmix.ops`` wrappers.

``deform_conv2d`` goes through the behaviours torchvision checks for its own ``deform_conv2d``
(forward and backward over random geometries, fp64 gradcheck, TorchScript, wrong sizes, its batch
sizes, torch.compile), compared with ``torchvision.ops.deform_conv2d`` itself. Every public wrapper
must script, trace under ``torch.compile(fullgraph=True)`` and raise argument errors that are
``RuntimeError`` (as torch and torchvision raise) while keeping the precise
``ValueError`` / ``TypeError`` / ``IndexError`` and the C++ message.

test_deform_conv2d.py holds the accuracy tests against the eager oracle; the geometries here are
the ones it leaves out (non-square kernels, per-axis stride / padding / dilation as pairs, no bias,
strided inputs, batch 0 and 33).
"""
from __future__ import annotations

import random
from typing import List, Optional, Tuple

import pytest
import torch

import tokenmix.ops as tm
from conftest import check_gradcheck
from tokenmix import registry
from tokenmix.errors import (TokenmixError, TokenmixIndexError, TokenmixTypeError,
                             TokenmixValueError)

try:
    from torchvision.ops import deform_conv2d as tv_deform_conv2d
except Exception:  # not installed, or built for another torch
    tv_deform_conv2d = None

needs_torchvision = pytest.mark.skipif(tv_deform_conv2d is None, reason="torchvision unavailable")

# Scripting warns that torch.jit.script is deprecated; the drop-in promise still covers it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


# ---- deform_conv2d against torchvision ----------------------------------------------------------


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _geometry(rng: random.Random) -> dict:
    """A random valid geometry: per-axis kernel, stride, padding, dilation; weight and offset
    groups dividing the channels; a map that leaves at least one output pixel."""
    groups, offset_groups = rng.choice([1, 2]), rng.choice([1, 2, 3])
    k = (rng.randint(1, 3), rng.randint(1, 3))
    s = (rng.randint(1, 2), rng.randint(1, 2))
    p = (rng.randint(0, 2), rng.randint(0, 2))
    d = (rng.randint(1, 2), rng.randint(1, 2))
    hw = tuple(max(d[i] * (k[i] - 1) + 1 - 2 * p[i], 1) + rng.randint(0, 4) for i in range(2))
    return dict(cin=groups * offset_groups * rng.randint(1, 2), cout=groups * rng.randint(1, 3),
                groups=groups, offset_groups=offset_groups, hw=hw, k=k, stride=s, padding=p,
                dilation=d)


def _random_geometries(n: int, seed: int) -> list:
    rng = random.Random(seed)
    # Mask and bias cycle through all four combinations; every third geometry has strided inputs.
    return [dict(_geometry(rng), mask=i % 2 == 0, bias=i // 2 % 2 == 0, contiguous=i % 3 != 2)
            for i in range(n)]


# torchvision's own test geometry (weight groups 2, offset groups 3, a 3x2 kernel, stride (2, 1),
# padding (1, 0), dilation (2, 1) on a 5x4 map).
TORCHVISION_GEOMETRY = dict(cin=6, cout=2, groups=2, offset_groups=3, hw=(5, 4), k=(3, 2),
                            stride=(2, 1), padding=(1, 0), dilation=(2, 1), mask=True, bias=True,
                            contiguous=True)
GEOMETRIES = _random_geometries(12, seed=2024)


def _geo_id(g: dict) -> str:
    pairs = "-".join(f"{key[0]}{g[key][0]}{g[key][1]}" for key in ("stride", "padding", "dilation"))
    flags = [name for name in ("mask", "bias") if g[name]] + ([] if g["contiguous"] else ["strided"])
    return "-".join([f"g{g['groups']}og{g['offset_groups']}-k{g['k'][0]}x{g['k'][1]}", pairs, *flags])


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (last two axes swapped in memory)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _inputs(g: dict, batch: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    (kh, kw), (H, W) = g["k"], g["hw"]
    Ho, Wo = (_out_size(g["hw"][i], g["k"][i], g["stride"][i], g["padding"][i], g["dilation"][i])
              for i in range(2))
    taps = g["offset_groups"] * kh * kw

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    t = dict(input=randn(batch, g["cin"], H, W),
             offset=randn(batch, 2 * taps, Ho, Wo, scale=2.0),
             weight=randn(g["cout"], g["cin"] // g["groups"], kh, kw, scale=(kh * kw) ** -0.5),
             bias=randn(g["cout"]) if g["bias"] else None,
             mask=torch.rand(batch, taps, Ho, Wo, generator=gen, dtype=torch.float64).to(dtype)
             if g["mask"] else None)
    if not g["contiguous"]:
        t = {n: _strided(v) if v is not None and v.dim() == 4 else v for n, v in t.items()}
    return t


def _call(fn, g: dict, t: dict) -> torch.Tensor:
    return fn(t["input"], t["offset"], t["weight"], t["bias"], g["stride"], g["padding"], g["dilation"],
              t["mask"])


def _grads(fn, g: dict, t: dict, seed: int = 3) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """fn's output and the gradients of every given tensor for a random output gradient."""
    leaves = {n: v.detach().clone().requires_grad_() if v is not None else None for n, v in t.items()}
    out = _call(fn, g, leaves)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    diff = [v for v in leaves.values() if v is not None]
    return out, list(torch.autograd.grad(out, diff, go))


@needs_torchvision
@pytest.mark.parametrize("g", GEOMETRIES, ids=_geo_id)
def test_forward_matches_torchvision(g):
    for batch in (1, 3):
        t = _inputs(g, batch, torch.float32, seed=batch)
        torch.testing.assert_close(_call(tm.deform_conv2d, g, t), _call(tv_deform_conv2d, g, t),
                                   rtol=1e-5, atol=1e-5)


@needs_torchvision
@pytest.mark.parametrize("g", GEOMETRIES, ids=_geo_id)
def test_backward_matches_torchvision(g):
    t = _inputs(g, 2, torch.float64, seed=7)
    ours, ours_grads = _grads(tm.deform_conv2d, g, t)
    theirs, theirs_grads = _grads(tv_deform_conv2d, g, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    names = [n for n, v in t.items() if v is not None]
    for name, a, b in zip(names, ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


@needs_torchvision
def test_backward_one_input_channel_per_group():
    """Depthwise deformable convolution (groups == C_in) with a weight that requires grad, several
    images and intra-op threads: torchvision computes its gradients."""
    g = dict(TORCHVISION_GEOMETRY, cin=2, cout=2, groups=2, offset_groups=1)
    t = _inputs(g, 4, torch.float64, seed=9)
    ours, ours_grads = _grads(tm.deform_conv2d, g, t)
    theirs, theirs_grads = _grads(tv_deform_conv2d, g, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@needs_torchvision
@pytest.mark.parametrize("batch", [0, 1, 33])
def test_batch_sizes_match_torchvision(batch):
    """The batch sizes torchvision's own tests run (empty, one, odd and large), forward and
    backward."""
    g = TORCHVISION_GEOMETRY
    t = _inputs(g, batch, torch.float64, seed=batch)
    ours, ours_grads = _grads(tm.deform_conv2d, g, t)
    theirs, theirs_grads = _grads(tv_deform_conv2d, g, t)
    assert ours.shape == theirs.shape == (batch, 2, 2, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck_pairs_without_bias():
    """fp64 gradcheck with per-axis pairs and no bias (test_deform_conv2d.py covers square ones)."""
    g = dict(TORCHVISION_GEOMETRY, cin=2, cout=2, groups=1, offset_groups=1, bias=False)
    t = _inputs(g, 1, torch.float64, seed=5)
    s, p, d = g["stride"], g["padding"], g["dilation"]
    check_gradcheck(lambda x, off, w, m: tm.deform_conv2d(x, off, w, None, s, p, d, m),
                    [t["input"], t["offset"], t["weight"], t["mask"]])


def _scripted_deform(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    # The int-or-pair arguments in each spelling a scripted caller may use.
    return [tm.deform_conv2d(x, offset, weight, bias, (2, 1), (1, 0), [2, 1], mask),
            tm.deform_conv2d(x, offset[:, :, :, :2], weight, stride=2, padding=1, dilation=2)]


@needs_torchvision
def test_scripted_caller_matches_eager_and_torchvision():
    g = TORCHVISION_GEOMETRY
    t = _inputs(g, 2, torch.float32)
    scripted = torch.jit.script(_scripted_deform)
    got = scripted(t["input"], t["offset"], t["weight"], t["bias"], t["mask"])
    want = _scripted_deform(t["input"], t["offset"], t["weight"], t["bias"], t["mask"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[0], _call(tv_deform_conv2d, g, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got[1], tv_deform_conv2d(t["input"], t["offset"][:, :, :, :2], t["weight"], stride=2, padding=1,
                                 dilation=2), rtol=1e-5, atol=1e-5)


@needs_torchvision
def test_compile_fullgraph_matches_torchvision():
    g = TORCHVISION_GEOMETRY
    t = _inputs(g, 3, torch.float32)

    def fn(x, offset, weight, bias, mask):
        return tm.deform_conv2d(x, offset, weight, bias, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                mask=mask)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ours, ours_grads = _grads(lambda x, o, w, b, s, p, d, m: compiled(x, o, w, b, m), g, t)
    theirs, theirs_grads = _grads(tv_deform_conv2d, g, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _wrong(name: str, t: dict) -> dict:
    """torchvision's geometry with one argument given a wrong size."""
    x, off, w, b, m = t["input"], t["offset"], t["weight"], t["bias"], t["mask"]
    change = {
        "offset_channels": dict(offset=off[:, :2]),
        "offset_channels_not_a_multiple": dict(offset=off[:, :-1]),
        "offset_height": dict(offset=off[:, :, :-1]),
        "offset_width": dict(offset=off[:, :, :, :-1]),
        "offset_batch": dict(offset=off[:1]),
        "offset_rank": dict(offset=off[0]),
        "mask_channels": dict(mask=m[:, :2]),
        "mask_height": dict(mask=m[:, :, :-1]),
        "mask_batch": dict(mask=m[:1]),
        "weight_in_channels": dict(weight=w[:, :1]),
        "weight_groups": dict(weight=w.new_ones(3, 3, 3, 2)),
        "weight_rank": dict(weight=w[0]),
        "bias_size": dict(bias=b[:1]),
        "map_smaller_than_kernel": dict(input=x[:, :, :1, :1]),
    }[name]
    return dict(t, **change)


WRONG_SIZES = ["offset_channels", "offset_channels_not_a_multiple", "offset_height", "offset_width",
               "offset_batch", "offset_rank", "mask_channels", "mask_height", "mask_batch",
               "weight_in_channels", "weight_groups", "weight_rank", "bias_size", "map_smaller_than_kernel"]


@pytest.mark.parametrize("case", WRONG_SIZES)
def test_wrong_sizes_raise_runtime_error(case):
    g = TORCHVISION_GEOMETRY
    t = _wrong(case, _inputs(g, 2, torch.float32))
    if tv_deform_conv2d is not None:
        with pytest.raises(RuntimeError):
            _call(tv_deform_conv2d, g, t)
    with pytest.raises(RuntimeError) as caught:
        _call(tm.deform_conv2d, g, t)
    assert type(caught.value) is TokenmixValueError
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith("tokenmix.deform_conv2d: ")


# ---- every public wrapper: TorchScript, torch.compile --------------------------------------------


def _wrapper_samples() -> list:
    """(wrapper name, args, kwargs) for every public wrapper; the raw op's sample arguments, which
    the wrappers take positionally too."""
    return [pytest.param(s.op, s.args, s.kwargs, id=s.name) for s in registry.samples("cpu", kinds=("basic",))]


def test_samples_cover_every_wrapper():
    assert {p.values[0] for p in _wrapper_samples()} == set(tm.__all__)


def _wrapper_args(name: str, args: tuple) -> list:
    """The sample's schema arguments as the wrapper's types: the schema's flat ``int[] shifts`` as
    the (dy, dx) pairs that the scripted wrapper is typed with."""
    names = [a.name for a in getattr(torch.ops.tokenmix, name).default._schema.arguments]
    return [list(zip(a[::2], a[1::2])) if n == "shifts" else a for n, a in zip(names, args)]


@pytest.mark.parametrize("name,args,kwargs", _wrapper_samples())
def test_wrapper_scripts(name, args, kwargs):
    fn = getattr(tm, name)
    args = _wrapper_args(name, args)
    scripted = torch.jit.script(fn)
    got, want = scripted(*args, **kwargs), fn(*args, **kwargs)
    got, want = (list(o) if isinstance(o, tuple) else [o] for o in (got, want))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _token_block(x: torch.Tensor, score: torch.Tensor, logits: torch.Tensor, policy: torch.Tensor,
                 q: torch.Tensor, table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A scripted caller chaining the wrappers, int-or-pair window arguments in both spellings.
    tokens, index = tm.topk_tokens(x, score, 4, keep_first=1)
    picked = tm.gather_tokens(x, index)
    merged = tm.scatter_tokens(x, index, tokens + picked)
    attn = tm.policy_softmax(logits, policy)
    windows = tm.window_attention(q, q, q, 4, shift_size=(2, 2), bias_table=table) \
        + tm.window_attention(q, q, q, [4, 4], 0, table, 0.5)
    return merged, attn, windows


def _block_inputs() -> Tuple[torch.Tensor, ...]:
    x, score, _ = registry.sample("topk_tokens").args
    logits, policy, _ = registry.sample("policy_softmax").args
    q, _, _, _, _, table, _ = registry.sample("window_attention_shifted").args
    return x, score, logits, policy, q, table


def test_scripted_caller_of_every_family():
    scripted = torch.jit.script(_token_block)
    ins = _block_inputs()
    for a, b in zip(scripted(*ins), _token_block(*ins)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gn_sample = registry.sample("gnconv")
    op, args, kwargs = gn_sample.overload, gn_sample.args, gn_sample.kwargs

    def gn(x: torch.Tensor, w: List[torch.Tensor]) -> torch.Tensor:
        return tm.gnconv(x, w[0], w[1], w[2], w[3], w[4:6], w[6:8], w[8], w[9], order=3, scale=0.5)

    flat = [args[0], [*args[1:5], *args[5], *args[6], *args[7:]]]
    torch.testing.assert_close(torch.jit.script(gn)(*flat), op(*args, **kwargs), rtol=0, atol=0)


def test_wrappers_compile_fullgraph():
    """One graph through every family's wrapper: the error conversion must not break it."""
    gn_sample = registry.sample("gnconv")
    args, kwargs = gn_sample.args, gn_sample.kwargs
    dargs = registry.sample("deform_conv2d").args

    def fn(x, score, logits, policy, q, table):
        merged, attn, windows = _token_block(x, score, logits, policy, q, table)
        return (merged, attn, windows, tm.gnconv(*args, **kwargs),
                tm.deform_conv2d(*dargs[:4], stride=1, padding=(1, 1), dilation=1, mask=dargs[7]))

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ins = _block_inputs()
    for a, b in zip(compiled(*ins), fn(*ins)):
        torch.testing.assert_close(a, b)


# ---- every public wrapper: exception types ------------------------------------------------------


def _error_cases() -> list:
    """(wrapper name, args, kwargs, the builtin type the C++ check raises) with the same arguments
    valid for the raw op, so that the two messages can be compared."""
    x, dup = registry.sample("gather_tokens").args
    _, uniq, src = registry.sample("scatter_tokens").args
    _, score, _ = registry.sample("topk_tokens").args
    logits, policy, eps = registry.sample("policy_softmax").args
    wa = registry.sample("window_attention_shifted").args
    da = registry.sample("deform_conv2d").args
    ga, gkw = registry.sample("gnconv").args, registry.sample("gnconv").kwargs
    q, k, v = wa[:3]
    dx, doff = da[:2]
    cases = [
        ("gather_tokens", (x, dup + 11), {}, IndexError, "out_of_range"),
        ("gather_tokens", (x, dup.short()), {}, TypeError, "index_dtype"),
        ("gather_tokens", (x, dup[0]), {}, ValueError, "index_rank"),
        ("scatter_tokens", (x, uniq - 20, src), {}, IndexError, "out_of_range"),
        ("scatter_tokens", (x, uniq, src.double()), {}, TypeError, "src_dtype"),
        ("scatter_tokens", (x, uniq[:, [0, 0]], src[:, :2]), {}, ValueError, "duplicates"),
        ("topk_tokens", (x, score, 20), {"keep_first": 1}, ValueError, "k_too_large"),
        ("policy_softmax", (logits, policy[:, 1:], eps), {}, ValueError, "policy_size"),
        ("policy_softmax", (logits, policy.long(), eps), {}, TypeError, "policy_dtype"),
        ("window_attention", (q, k, v[:, :4], *wa[3:]), {}, ValueError, "v_shape"),
        ("window_attention", (q.double(), k, v, *wa[3:]), {}, TypeError, "q_dtype"),
        ("deform_conv2d", (dx, doff[:, :5], *da[2:]), {}, ValueError, "offset_channels"),
        ("deform_conv2d", (dx, doff.double(), *da[2:]), {}, TypeError, "offset_dtype"),
        ("gnconv", ga, dict(gkw, order=9), ValueError, "order"),
        ("gnconv", (*ga[:-1], ga[-1].double()), gkw, TypeError, "bias_dtype"),
    ]
    return [pytest.param(*c[:4], id=f"{c[0]}-{c[4]}") for c in cases]


CONVERTED = {ValueError: TokenmixValueError, TypeError: TokenmixTypeError, IndexError: TokenmixIndexError}


@pytest.mark.parametrize("name,args,kwargs,builtin", _error_cases())
def test_wrapper_errors_are_runtime_errors(name, args, kwargs, builtin):
    with pytest.raises(builtin) as raw:
        getattr(torch.ops.tokenmix, name)(*args, **kwargs)
    assert type(raw.value) is builtin
    with pytest.raises(RuntimeError) as wrapped:
        getattr(tm, name)(*args, **kwargs)
    err = wrapped.value
    assert type(err) is CONVERTED[builtin]
    assert isinstance(err, builtin) and isinstance(err, TokenmixError)
    assert str(err) == str(raw.value)
    assert err.__cause__ is None and err.__suppress_context__


def test_other_errors_pass_through_unchanged():
    """torch's own argument parsing already raises RuntimeError: left as it is."""
    with pytest.raises(RuntimeError) as caught:
        tm.gather_tokens(torch.randn(2, 5, 3), 3)
    assert type(caught.value) is RuntimeError


def test_scripted_errors_are_runtime_errors():
    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return tm.gather_tokens(x, index)

    with pytest.raises(RuntimeError, match=r"index entries must lie in \[0, 5\)"):
        torch.jit.script(gather)(torch.randn(2, 5, 3), torch.full((2, 1), 5))
