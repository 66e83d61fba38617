"""The HorNet backbones (tokenmix.models.hornet: hornet_tiny_7x7, hornet_tiny_gf) against the
official network re-implemented in tokenmix.reference.hornet_official, and GnConv's ``fused``
switch.

Each network comparison randomises the official network, loads its state_dict (official keys)
into the tokenmix network with strict=True, fused and unfused, and compares in fp64 the logits and
the gradient of every parameter. HorNet-GF's global filter takes its FFT in fp32 (the official
code casts to fp32 there), so its comparisons with the official network hold to fp32 rounding;
fused and unfused tokenmix networks agree to fp64 rounding in both variants."""
from __future__ import annotations

import copy
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

import tokenmix.models as models
import tokenmix.reference.hornet_official as official
from conftest import (assert_channels_last_matches, check_against_oracle, seeded as _gen, seeded_randn as _x,
                      state_shapes as _shapes)
from tokenmix.bench.shift_modules import randomise
from tokenmix.nn import GlobalLocalFilter, GnConv
from tokenmix.reference.gnconv import GnConv as EagerGnConv

F64 = torch.float64
NAMES = ["hornet_tiny_7x7", "hornet_tiny_gf"]
# Parameters (the paper: 22 M and 23 M).
PARAMS = {"hornet_tiny_7x7": 22_409_512, "hornet_tiny_gf": 22_991_848}





@pytest.fixture(scope="module")
def oracle():
    """``oracle(name)``: the official network, randomised (fp32), built once per module; tests
    that change it take a deepcopy."""
    cache = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = randomise(getattr(official, name)(), _gen())
        return cache[name]
    return get


# ---- architecture -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_hornet_architecture_and_keys(name, oracle):
    assert name in models.list_models()
    model, ref = models.create(name), oracle(name)
    # Official initialisation: layer scales 1e-6, LayerNorms at identity, zero biases.
    blk = model.stages[2][5]
    assert torch.all(blk.gamma1 == 1e-6) and torch.all(blk.gamma2 == 1e-6)
    assert torch.all(blk.norm1.weight == 1) and torch.all(blk.pwconv1.bias == 0)
    assert 0.01 < blk.pwconv1.weight.std().item() < 0.03
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.2f} M parameters")
    assert n == PARAMS[name] == sum(p.numel() for p in ref.parameters())
    # The same keys and shapes (GnConv registers pws before proj_out, the official gnconv after:
    # names match, their order within a gnconv differs); strict loads both ways.
    assert _shapes(model) == _shapes(ref)
    model.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ref.load_state_dict(model.state_dict(), strict=True)
    # Depths, widths, orders, scale, spatial mixers.
    gf = name.endswith("gf")
    assert [len(s) for s in model.stages] == [2, 3, 18, 2]
    for i, stage in enumerate(model.stages):
        for blk in stage:
            g = blk.gnconv
            assert (g.order, g.scale, g.proj_out.in_channels) == (i + 2, 1.0 / 3.0, 64 * 2 ** i)
            if gf and i >= 2:
                assert isinstance(g.dwconv, GlobalLocalFilter)
                assert g.dwconv.complex_weight.shape[1:3] == ((14, 8) if i == 2 else (7, 4))
            else:
                assert isinstance(g.dwconv, nn.Conv2d) and g.dwconv.kernel_size == (7, 7)
    assert model.downsample_layers[0][0].stride == (4, 4) and model.downsample_layers[1][1].stride == (2, 2)
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        getattr(models.hornet, name)(pretrained=True)


def test_hornet_options():
    """Drop-path rates rising linearly to drop_path_rate, no layer scale, headless, the timm
    interface (on a small HorNet: the same code as the tiny models)."""
    cfg = dict(depths=[1, 2, 1, 2], base_dim=16, layer_scale_init_value=0)
    m = models.hornet.HorNet(num_classes=0, drop_path_rate=0.2, orders=[2, 3, 4, 4], s=0.5,
                             global_filters=[None, (6, 4), None, (2, 2)], **cfg)
    blocks = [b for s in m.stages for b in s]
    assert isinstance(blocks[0].drop_path, nn.Identity) and blocks[-1].drop_path.p == pytest.approx(0.2)
    assert blocks[0].gamma1 is None and "stages.0.0.gamma1" not in m.state_dict()
    late = [dict(gflayer=official.GlobalLocalFilter, h=6, w=4), dict(gflayer=official.GlobalLocalFilter, h=2, w=2)]
    ref = official.HorNet(gnconv=[partial(official.gnconv, order=2, s=0.5),
                                  partial(official.gnconv, order=3, s=0.5, **late[0]),
                                  partial(official.gnconv, order=4, s=0.5),
                                  partial(official.gnconv, order=4, s=0.5, **late[1])], **cfg)
    assert _shapes(ref) == {**_shapes(m), "head.weight": (1000, 128), "head.bias": (1000,)}
    x = torch.randn(1, 3, 64, 64, generator=_gen())
    with torch.no_grad():
        feats = m.eval().forward_features(x)
        assert feats.shape == (1, 128, 2, 2) and m(x).shape == (1, 128)
        assert torch.equal(m.forward_head(feats, pre_logits=True), m(x))
        ref.head = nn.Identity()
        ref.load_state_dict(randomise(m, _gen()).state_dict(), strict=True)
        torch.testing.assert_close(m(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
    m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m.num_features == 128
    m.train()(x).sum().backward()  # stochastic depth in training
    with pytest.raises(ValueError, match="per stage"):
        models.hornet.HorNet(depths=[1, 1, 1])


# ---- GnConv's fused switch -----------------------------------------------------------------------

@pytest.mark.parametrize("order", [2, 5])
def test_gnconv_unfused_is_the_eager_computation(order):
    dim = 32
    fused, unfused = GnConv(dim, order=order), GnConv(dim, order=order, fused=False)
    randomise(fused, _gen())
    unfused.load_state_dict(fused.state_dict(), strict=True)
    eager = EagerGnConv(dim, order=order)
    eager.load_state_dict(fused.state_dict(), strict=True)
    assert list(fused.state_dict()) == list(unfused.state_dict()) and fused.fused and not unfused.fused
    names = [n for n, _ in fused.named_parameters()]

    def run(mod):
        return lambda x, *ps: torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    x = _x(2, dim, 9, 10)
    params = [p.detach() for p in fused.parameters()]
    check_against_oracle(run(fused), run(unfused), [x] + params, F64)
    check_against_oracle(run(unfused), run(eager), [x] + params, F64)
    # Flipping the attribute switches a built module.
    with torch.no_grad():
        a = fused(x.float())
        fused.fused = False
        torch.testing.assert_close(fused(x.float()), a, rtol=1e-5, atol=1e-5)


# ---- numerics: fused, unfused and official --------------------------------------------------------

def _grad_errors(net: nn.Module, grads_ref: dict) -> dict:
    """Each parameter's gradient error against its own scale, floored at 1e-6 of the largest."""
    floor = 1e-6 * max(g.abs().max().item() for g in grads_ref.values())
    return {n: ((p.grad - grads_ref[n]).abs().max() / max(floor, grads_ref[n].abs().max().item())).item()
            for n, p in net.named_parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_hornet_fused_equals_unfused_and_official(name, oracle):
    """Logits and every parameter gradient, fp64, train mode, a 64 x 64 image (HorNet-GF's
    filters resized to the 4 x 3 and 2 x 2 spectra of stages 3 and 4; batch 1 for speed: fp64
    depthwise convolutions are slow on the CPU)."""
    ref = copy.deepcopy(oracle(name)).double().train()
    nets = {"fused": models.create(name), "unfused": models.create(name, fused=False)}
    x = _x(1, 3, 64, 64)
    g = torch.randn(1, 1000, generator=_gen(5), dtype=F64)
    out_ref = ref(x)
    out_ref.backward(g)
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    # The official global filter runs its FFT in fp32: fp32 rounding there, fp64 elsewhere.
    tol = 1e-9 if name.endswith("7x7") else 1e-5
    outs, grads = {}, {}
    for tag, net in nets.items():
        net.load_state_dict(ref.state_dict(), strict=True)
        net.double().train()
        out = net(x)
        out.backward(g)
        outs[tag], grads[tag] = out, {n: p.grad for n, p in net.named_parameters()}
        scale = out_ref.abs().max().item()
        err = (out - out_ref).abs().max().item() / scale
        errs = _grad_errors(net, grads_ref)
        worst = max(errs, key=errs.get)
        print(f"{name} {tag}: logits relative error {err:.1e}, worst gradient {worst} {errs[worst]:.1e}")
        assert err < tol, f"{tag}: logits relative error {err:.3e}"
        assert errs[worst] < tol, f"{tag}: grad {worst} relative error {errs[worst]:.3e}"
    # Fused vs unfused: the same computation up to fp64 rounding, global filters included.
    torch.testing.assert_close(outs["fused"], outs["unfused"], rtol=1e-10, atol=1e-10 * out_ref.abs().max().item())
    errs = _grad_errors(nets["fused"], grads["unfused"])
    assert max(errs.values()) < 1e-9, max(errs.items(), key=lambda kv: kv[1])
    gnconvs = {tag: [b.gnconv for s in net.stages for b in s] for tag, net in nets.items()}
    assert all(m.fused for m in gnconvs["fused"]) and not any(m.fused for m in gnconvs["unfused"])


def test_hornet_gf_at_224(oracle):
    """At 224 x 224 the filters fit the spectra (14 x 8, 7 x 4) exactly: one eval forward, fp32,
    batch 1, against the official network, fused and unfused (GnConv.fused flipped)."""
    ref = oracle("hornet_tiny_gf").eval()
    model = models.create("hornet_tiny_gf").eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=_gen(2))
    with torch.no_grad():
        feats = model.forward_features(x)
        out, out_ref = model.forward_head(feats), ref(x)
        for blk in [b for s in model.stages for b in s]:
            blk.gnconv.fused = False
        out_unfused = model(x)
    assert feats.shape == (1, 512, 7, 7) and out.shape == (1, 1000)
    scale = out_ref.abs().max().item()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(out, out_unfused, rtol=1e-4, atol=1e-4 * scale)


# ---- timm, channels_last, packaging ----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_hornet_timm_and_channels_last(name):
    timm = pytest.importorskip("timm")
    assert name in timm.list_models("hornet_tiny*")
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1).eval()
    assert isinstance(model, models.hornet.HorNet) and model.num_classes == 10
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["architecture"] == name
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        timm.create_model(name, pretrained=True)
    assert_channels_last_matches(model, torch.randn(2, 3, 64, 64, generator=_gen()), 10)


def test_library_does_not_import_the_oracle():
    code = "import sys, tokenmix.models; print(any(k.startswith('tokenmix.reference') for k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
