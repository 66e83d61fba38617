"""Mixed precision: every op and module under ``torch.autocast`` (CPU bf16 here; CUDA fp16/bf16
beside it, skipped without a GPU) against the fp64 oracle, relative to what the eager oracle loses
under the same autocast; each op's autocast policy (docs/api.md, "Mixed precision"); fp32 parameters
beside low-precision activations without autocast; accelerated timm models trained under autocast."""
import functools

import pytest
import torch
import torch.nn.functional as F

import tokenmix
import tokenmix.ops as tm
from conftest import AUTOCAST, DEVICES, assert_close_to_exact, check_autocast
from tokenmix import reference as ref
from tokenmix import registry
from tokenmix.nn import DeformablePatchMerging, GlobalWindowAttention, GnConv, HireMLP, WindowAttention
from tokenmix.testing import clone_inputs, module_functions

GEN = torch.Generator().manual_seed(11)
F32, BF16 = torch.float32, torch.bfloat16


def rnd(*shape, dtype=F32, scale=1.0):
    return (scale * torch.randn(*shape, generator=GEN)).to(dtype)


def _to(device, *ts):
    return [[u.to(device) for u in t] if isinstance(t, list) else t.to(device) for t in ts]


# ---- ops: (name, fused, oracle, inputs(device, amp)); output dtypes from the registry's policy --
# Inputs mix dtypes the way autocast regions produce them: fp32 parameters and residual streams
# beside activations that came out of an autocast Linear or Conv in the low-precision dtype.


def _gather(device, amp):
    x = rnd(2, 9, 16)
    idx = torch.randint(0, 9, (2, 5), generator=GEN)
    return _to(device, x, idx)


def _scatter(device, amp):
    x = rnd(2, 9, 16)
    idx = torch.stack([torch.randperm(9, generator=GEN)[:4] for _ in range(2)])
    return _to(device, x, idx, rnd(2, 4, 16, dtype=amp))


def _topk(device, amp):
    return _to(device, rnd(2, 9, 16), rnd(2, 8, dtype=amp))


def _policy(device, amp):
    return _to(device, rnd(2, 3, 9, 9, dtype=amp, scale=2.0), torch.rand(2, 9, generator=GEN))


def _window(device, amp):
    q, k, v = (rnd(2, 8, 8, 2, 16) for _ in range(3))
    return _to(device, q, k, v, rnd(49, 2, scale=0.5))


def _deform(device, amp):
    x = rnd(2, 8, 7, 9)
    off = rnd(2, 18, 7, 9, dtype=amp)          # predicted by a Conv2d inside the autocast region
    w, b = rnd(6, 8, 3, 3, scale=0.3), rnd(6)
    mask = torch.rand(2, 9, 7, 9, generator=GEN)
    return _to(device, x, off, w, b, mask)


def _gnconv(device, amp):
    dim, order = 16, 3
    dims = ref.gnconv.gate_dims(dim, order)
    pw = [rnd(dims[i + 1], dims[i], 1, 1, scale=0.3) for i in range(order - 1)]
    pb = [rnd(dims[i + 1], scale=0.3) for i in range(order - 1)]
    return _to(device, rnd(2, dim, 6, 7), rnd(2 * dim, dim, 1, 1, scale=0.3), rnd(2 * dim, scale=0.3),
               rnd(sum(dims), 1, 7, 7, scale=0.3), rnd(sum(dims), scale=0.3), pw, pb,
               rnd(dim, dim, 1, 1, scale=0.3), rnd(dim, scale=0.3))


OP_CASES = {
    # data movement keeps its dtype
    "gather_tokens": (tm.gather_tokens, ref.gather.gather_tokens, _gather),
    "topk_tokens": (lambda x, s: tm.topk_tokens(x, s, 5, keep_first=1),
                    lambda x, s: ref.gather.topk_tokens(x, s, 5, keep_first=1), _topk),
    # two activations merged: the widest wins
    "scatter_tokens": (tm.scatter_tokens, ref.gather.scatter_tokens, _scatter),
    # fp32 reductions on the logits' dtype, fp32 policy accepted as it is
    "policy_softmax": (tm.policy_softmax, ref.gather.policy_softmax, _policy),
    # accurate low-precision kernels: run in the autocast dtype
    "window_attention": (
        lambda q, k, v, t: tm.window_attention(q, k, v, window_size=4, shift_size=2, bias_table=t),
        lambda q, k, v, t: ref.window_attention.window_attention(q, k, v, window_size=4, shift_size=2,
                                                                 bias_table=t),
        _window),
    "deform_conv2d": (
        lambda x, o, w, b, m: tm.deform_conv2d(x, o, w, b, padding=1, mask=m),
        lambda x, o, w, b, m: ref.deform_conv2d.deform_conv2d(x, o, w, b, padding=1, mask=m),
        _deform),
    "gnconv": (
        lambda *a: tm.gnconv(*a, order=3, scale=1 / 3),
        lambda *a: ref.gnconv.gnconv(*a, order=3, scale=1 / 3),
        _gnconv),
}


def _registry_case(name: str) -> tuple:
    """(fused, oracle, inputs(device, amp)) from the op's first basic sample in the registry, for
    the ops without a hand-written case above: every input in fp32, as an autocast region hands
    a model's activations and parameters to its first op."""
    spec = registry.op(name)
    sample = next(s for s in spec.make_samples("cpu", F32) if s.kind == "basic")

    def make(device, amp):
        return clone_inputs(sample.args, None, False, device)

    return (lambda *a: spec.fused()(*a, **sample.kwargs), lambda *a: spec.load_oracle()(*a, **sample.kwargs),
            make)


OP_CASES.update({name: _registry_case(name) for name in registry.OPS if name not in OP_CASES})


def _policy_dtypes(name: str, inputs: list, amp: torch.dtype) -> list:
    """The floating output's dtype under the op's autocast policy in tokenmix.registry (which
    test_registry.py matches with the C++ TM_AUTOCAST lines): lower -> the autocast dtype,
    promote -> the widest floating input's, keep -> the first floating input's."""
    floats = [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    policy = registry.op(name).autocast
    if policy == "lower":
        return [amp]
    if policy == "promote":
        return [functools.reduce(torch.promote_types, floats)]
    return [floats[0]]


@pytest.mark.parametrize("device,amp", AUTOCAST)
@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_under_autocast(device, amp, name):
    fused, oracle, make = OP_CASES[name]
    inputs = make(device, amp)
    check_autocast(fused, oracle, inputs, device, amp, _policy_dtypes(name, inputs, amp))


def test_every_op_has_an_autocast_case():
    assert set(OP_CASES) == set(tokenmix.OPS)


@pytest.mark.parametrize("device,amp", AUTOCAST)
def test_autocast_kernels_registered(device, amp):
    key = "AutocastCPU" if device == "cpu" else "AutocastCUDA"
    for op in tokenmix.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenmix::{op}", key), op


@pytest.mark.parametrize("device,amp", AUTOCAST)
def test_autocast_leaves_fp64_alone(device, amp):
    q, k, v, t = (x.double() for x in _window(device, amp))
    with torch.autocast(device, dtype=amp):
        out = tm.window_attention(q, k, v, window_size=4, bias_table=t)
    assert out.dtype == torch.float64


# ---- mixed dtypes without autocast -----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", [BF16, torch.float16])
def test_fp32_bias_table_beside_low_precision_qkv(device, low):
    if device == "cpu" and low == torch.float16:
        pytest.skip("the CPU kernels take bf16, not fp16")
    q, k, v, table = _window(device, low)
    q, k, v = (t.to(low).requires_grad_() for t in (q, k, v))
    table.requires_grad_()
    out = tm.window_attention(q, k, v, window_size=4, shift_size=2, bias_table=table)
    assert out.dtype == low
    g = torch.randn(out.shape, generator=GEN).to(device)
    grads = torch.autograd.grad(out, (q, k, v, table), g.to(low))
    assert [x.dtype for x in grads] == [low, low, low, F32]
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    exact = ref.window_attention.window_attention(*ins[:3], window_size=4, shift_size=2, bias_table=ins[3])
    exact_grads = torch.autograd.grad(exact, ins, g.double())
    assert_close_to_exact(out, None, exact, low, "output")
    for i, (a, e) in enumerate(zip(grads, exact_grads)):
        assert_close_to_exact(a, None, e, low, f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_policy_beside_bf16_logits(device):
    logits, policy = _policy(device, BF16)
    logits.requires_grad_()
    policy.requires_grad_()
    out = tm.policy_softmax(logits, policy)
    assert out.dtype == BF16
    g = torch.randn(out.shape, generator=GEN).to(device)
    gl, gp = torch.autograd.grad(out, (logits, policy), g.to(BF16))
    assert gl.dtype == BF16 and gp.dtype == F32
    ins = [logits.detach().double().requires_grad_(), policy.detach().double().requires_grad_()]
    exact = ref.gather.policy_softmax(*ins)
    egl, egp = torch.autograd.grad(exact, ins, g.double())
    assert_close_to_exact(out, None, exact, BF16, "output")
    assert_close_to_exact(gl, None, egl, BF16, "grad logits")
    assert_close_to_exact(gp, None, egp, BF16, "grad policy")


def test_low_precision_weights_without_autocast_still_rejected():
    """Outside autocast only the documented mixes are accepted (as F.conv2d rejects the rest)."""
    args = _gnconv("cpu", BF16)
    args[0] = args[0].to(BF16)
    with pytest.raises(TypeError, match="proj_in_weight must have the dtype of x"):
        tm.gnconv(*args, order=3, scale=1 / 3)


# ---- modules --------------------------------------------------------------------------------


def _module_case(name, device):
    """(module, oracle forward(module, params, *inputs) from tokenmix.reference.modules, inputs)."""
    if name in SHIFT_MODULES:   # the registry's sample: the module in eval mode, its inputs
        spec = registry.MODULES[name]
        ms = spec.make()
        return ms.module.eval(), spec.load_oracle(), list(ms.inputs)
    torch.manual_seed(3)
    if name == "WindowAttention":
        mod = WindowAttention(32, 2, window_size=4, shift_size=2)
        return mod, ref.modules.window_attention, [rnd(2, 8, 8, 32)]
    if name == "GlobalWindowAttention":
        mod = GlobalWindowAttention(32, 2, window_size=4)
        return mod, ref.modules.global_window_attention, [rnd(2, 8, 8, 32), rnd(2, 4, 4, 32)]
    if name == "DeformablePatchMerging":
        # Eval mode: in train mode BatchNorm makes the gradient of dconv.bias cancel to zero
        # exactly, so its error could only be judged against the terms that cancel.
        mod = DeformablePatchMerging(8, 16).eval()
        with torch.no_grad():   # non-zero offsets and statistics, so everything is exercised
            mod.dconv.conv_offset.weight.normal_(0, 0.1, generator=GEN)
            mod.norm_layer.running_mean.normal_(0, 0.2, generator=GEN)
            mod.norm_layer.running_var.uniform_(0.5, 1.5, generator=GEN)
        return mod, ref.modules.deformable_patch_merging, [rnd(2, 8, 8, 10)]
    mod = GnConv(16, order=3)
    return mod, ref.modules.gnconv, [rnd(2, 16, 7, 6)]


SHIFT_MODULES = ["HireMLP", "CycleFC", "AxialShift", "RaftTokenMixer"]
MODULES = ["WindowAttention", "GlobalWindowAttention", "DeformablePatchMerging", "GnConv", *SHIFT_MODULES]


@pytest.mark.parametrize("device,amp", AUTOCAST)
@pytest.mark.parametrize("name", MODULES)
def test_module_under_autocast(device, amp, name):
    mod, oracle_forward, inputs = _module_case(name, device)
    mod = mod.to(device)
    fused, oracle, _ = module_functions(mod, oracle_forward, len(inputs))
    params = [p.detach() for p in mod.parameters()]
    # RaftMLP's block ends in a residual: the fp32 input plus the low-precision mixer is fp32.
    out_dtype = torch.float32 if name == "RaftTokenMixer" else amp
    check_autocast(fused, oracle, [x.to(device) for x in inputs] + params, device, amp, [out_dtype])


@pytest.mark.parametrize("device,amp", AUTOCAST)
def test_hire_mlp_batched_mix_under_autocast(device, amp):
    """On a map of 32 x 32 pixels HireMLP mixes its branches with batched products, which run in
    the autocast dtype; outputs and gradients stay as close to fp64 as the official module's."""
    torch.manual_seed(4)
    mod = HireMLP(8, pixel=4, step=2).eval().to(device)
    fused, oracle, _ = module_functions(mod, registry.MODULES["HireMLP"].load_oracle(), 1)
    params = [p.detach() for p in mod.parameters()]
    check_autocast(fused, oracle, [rnd(2, 8, 32, 32).to(device)] + params, device, amp, [amp])


# ---- accelerated timm models ----------------------------------------------------------------

MODELS = ["swin_tiny_patch4_window7_224", "gcvit_xxtiny"]


def _timm():
    try:
        import timm
    except Exception as exc:  # not installed, or a torchvision built for another torch
        pytest.skip(f"timm unavailable: {exc}")
    return timm


def _model_pair(name: str, device: str):
    import copy
    torch.manual_seed(0)
    # train mode without stochastic depth: both models take the same path
    plain = _timm().create_model(name, pretrained=False, drop_path_rate=0.0).to(device).train()
    fused = tokenmix.accelerate(copy.deepcopy(plain))
    assert all(r.replaced for r in fused.tokenmix_report), fused.tokenmix_report
    return plain, fused


@pytest.mark.parametrize("device,amp", AUTOCAST)
@pytest.mark.parametrize("name", MODELS)
def test_accelerated_model_matches_plain_under_autocast(device, amp, name):
    """Logits and every parameter gradient of the accelerated model are as close to the fp64
    model as the plain timm model's under the same autocast; fp32 parameters get fp32 grads."""
    import copy
    plain, fused = _model_pair(name, device)
    exact = copy.deepcopy(plain).double()
    x = torch.randn(2, 3, 224, 224, generator=GEN).to(device)
    g = torch.randn(2, 1000, generator=GEN).to(device)
    out_x = exact(x.double())
    out_x.backward(g.double())
    runs = {}
    for tag, m in (("plain", plain), ("fused", fused)):
        with torch.autocast(device, dtype=amp):
            out = m(x)
        out.float().backward(g)
        runs[tag] = out, dict(m.named_parameters())

    def err(a, b):
        return (a.double() - b).norm().item()

    out_p, out_f = runs["plain"][0], runs["fused"][0]
    assert out_f.dtype == out_p.dtype
    floor = 1e-3 * out_x.norm().item()
    assert err(out_f, out_x) <= 1.5 * err(out_p, out_x) + floor
    for n, px in exact.named_parameters():
        pp, pf = runs["plain"][1][n], runs["fused"][1][n]
        assert pf.grad.dtype == pf.dtype == torch.float32, n
        bound = 2.0 * err(pp.grad, px.grad) + 1e-2 * px.grad.norm().item() + 1e-12
        assert err(pf.grad, px.grad) <= bound, f"{n}: {err(pf.grad, px.grad):.3e} > {bound:.3e}"


@pytest.mark.parametrize("device,amp", AUTOCAST)
@pytest.mark.parametrize("name", MODELS)
def test_sgd_under_autocast_same_loss_curve(device, amp, name):
    """Ten SGD steps under autocast (with a GradScaler for fp16): the accelerated model's loss
    curve is the plain model's within the autocast dtype's tolerance."""
    plain, fused = _model_pair(name, device)
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(2, 3, 224, 224, generator=gen).to(device),
                torch.randint(0, 1000, (2,), generator=gen).to(device)) for _ in range(10)]
    curves = []
    for model in (plain, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
        losses = []
        for x, y in batches:
            with torch.autocast(device, dtype=amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert torch.isfinite(curves[1]).all()
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-2, atol=1e-2)
