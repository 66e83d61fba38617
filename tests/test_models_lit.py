"""The LIT backbone (tokenmix.models.lit: lit_ti) against the official network re-implemented in
tokenmix.reference.lit_official, and the ``fused`` switch of its token mixers (deformable token
merging, attention).

Each network comparison randomises the official network (so the merging layers sample at
fractional offsets, some outside the map), loads its state_dict (official keys) into the tokenmix
network with strict=True, fused and unfused, and compares in fp64 the logits and the gradient of
every parameter, in training mode (BatchNorm on batch statistics) and in eval mode."""
from __future__ import annotations

import ast
import copy
import inspect
import io
import pickle
from functools import partial

import pytest
import torch
from torch import nn

import tokenmix.models as models
import tokenmix.models.lit as lit
import tokenmix.ops as tm
import tokenmix.reference.lit_official as official
from conftest import (assert_channels_last_matches, check_against_oracle, seeded as _gen, seeded_randn as _x,
                      state_shapes as _shapes)
from tokenmix.bench.shift_modules import randomise
from tokenmix.reference.deform_conv2d import deform_conv2d as deform_oracle

F64 = torch.float64
# Parameters of LIT-Ti, counted layer by layer from the official code (its README gives 19 M).
PARAMS = 19_886_272
# A small LIT (the same code as LIT-Ti): 64 x 64 inputs, a 2 x 2 map in stage 4.
SMALL = dict(img_size=64, embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2],
             depths=[1, 2, 2, 1], qkv_bias=True)





def _small_official(**kwargs) -> nn.Module:
    return official.LIT(patch_size=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **SMALL, **kwargs)


def _small(**kwargs) -> lit.LIT:
    return lit.LIT(patch_size=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **SMALL, **kwargs)


@pytest.fixture(scope="module")
def oracle():
    """The official LIT-Ti, randomised (fp32), built once; tests that change it take a deepcopy."""
    return randomise(official.lit_ti(), _gen())


def _mixers(net: nn.Module) -> list:
    return [m for m in net.modules() if isinstance(m, (lit.DeformableTokenMerging, lit.Attention))]


# ---- architecture -------------------------------------------------------------------------------

def test_lit_architecture_and_keys(oracle):
    assert "lit_ti" in models.list_models()
    model = models.create("lit_ti")
    # Configuration: MLP blocks in stages 1-2, attention in 3-4; stem norm eps 1e-5, others 1e-6.
    assert [len(b) for b in (model.block1, model.block2, model.block3, model.block4)] == [3, 4, 6, 3]
    assert all(isinstance(b, lit.MLPBlock) for b in [*model.block1, *model.block2])
    assert all(isinstance(b, lit.ViTBlock) for b in [*model.block3, *model.block4])
    assert [b.attn.num_heads for b in (model.block3[0], model.block4[0])] == [5, 8]
    assert model.block1[0].mlp.fc1.out_features == 512 and model.block4[0].mlp.fc1.out_features == 2048
    assert model.patch_embed1.norm.eps == 1e-5 and model.norm.eps == model.block3[0].norm1.eps == 1e-6
    assert model.patch_embed1.proj.stride == (4, 4)
    assert model.pos_embed1.shape == (1, 56 * 56, 64) and model.pos_embed4.shape == (1, 7 * 7 + 1, 512)
    # Official initialisation: zero offset branches (a plain 2x2 conv at first), BatchNorms and
    # LayerNorms at identity, truncated-normal (0.02) Linear weights with zero biases, embeddings.
    for merge in (model.patch_embed2, model.patch_embed3, model.patch_embed4):
        assert isinstance(merge, lit.DeformableTokenMerging) and merge.fused
        assert not merge.dconv.conv_offset.weight.any() and not merge.dconv.conv_offset.bias.any()
        assert torch.all(merge.norm_layer.weight == 1) and not merge.norm_layer.bias.any()
        bound = 1 / (merge.dconv.weight[0].numel() ** 0.5)
        assert merge.dconv.weight.abs().max() <= bound and merge.dconv.bias.abs().max() <= bound
    blk = model.block3[2]
    assert 0.015 < blk.attn.qkv.weight.std().item() < 0.025 and not blk.attn.qkv.bias.any()
    assert torch.all(blk.norm1.weight == 1) and not blk.mlp.fc2.bias.any()
    for p in (model.pos_embed2, model.cls_token):
        assert p.abs().max() <= 2 and 0.01 < p.std().item() < 0.03
    assert model.no_weight_decay() == {"cls_token"}
    assert model.default_cfg["file"] == "lit_ti.pth" and model.default_cfg["url"] == ""
    assert lit.default_cfgs["lit_ti"]["input_size"] == (3, 224, 224)

    n = sum(p.numel() for p in model.parameters())
    print(f"lit_ti: {n / 1e6:.2f} M parameters")
    assert n == PARAMS == sum(p.numel() for p in oracle.parameters())
    # The same keys, shapes and order (parameters registered in the official order, so an
    # official optimizer state maps onto ours); strict loads both ways.
    assert list(model.state_dict()) == list(oracle.state_dict())
    assert _shapes(model) == _shapes(oracle)
    copy.deepcopy(oracle).load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(oracle.state_dict(), strict=True)
    for k, v in oracle.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---- numerics: fused, unfused and official --------------------------------------------------------

def _grad_errors(grads: dict, grads_ref: dict) -> dict:
    """Each parameter's gradient error against its own scale, floored at 1e-6 of the largest."""
    floor = 1e-6 * max(g.abs().max().item() for g in grads_ref.values())
    return {n: ((g - grads_ref[n]).abs().max() / max(floor, grads_ref[n].abs().max().item())).item()
            for n, g in grads.items()}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lit_fused_equals_unfused_and_official(train):
    """Logits and every parameter gradient, fp64, a small LIT at 64 x 64 (batch 2: BatchNorm in
    training mode needs more than one value per channel on stage 4's 2 x 2 map)."""
    ref = randomise(_small_official(), _gen()).double().train(train)
    state = copy.deepcopy(ref.state_dict())  # before the official forward updates BatchNorm statistics
    x = _x(2, 3, 64, 64)
    g = torch.randn(2, 1000, generator=_gen(5), dtype=F64)
    out_ref = ref(x)
    out_ref.backward(g)
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    outs, grads = {}, {}
    for fused in (True, False):
        net = _small(fused=fused)
        net.load_state_dict(state, strict=True)
        net.double().train(train)
        out = net(x)
        out.backward(g)
        outs[fused], grads[fused] = out, {n: p.grad for n, p in net.named_parameters()}
        err = (out - out_ref).abs().max().item() / out_ref.abs().max().item()
        errs = _grad_errors(grads[fused], grads_ref)
        worst = max(errs, key=errs.get)
        print(f"fused={fused} train={train}: logits relative error {err:.1e}, worst gradient {worst} {errs[worst]:.1e}")
        assert err < 1e-10, f"fused={fused}: logits relative error {err:.3e}"
        assert errs[worst] < 1e-9, f"fused={fused}: grad {worst} relative error {errs[worst]:.3e}"
        assert all(m.fused == fused for m in _mixers(net)) and len(_mixers(net)) == 3 + 3
        # The merging layers' BatchNorms updated their statistics (training) as the official ones.
        for k, v in ref.state_dict().items():
            if "running" in k:
                torch.testing.assert_close(net.state_dict()[k], v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-10, atol=1e-10 * out_ref.abs().max().item())
    errs = _grad_errors(grads[True], grads[False])
    assert max(errs.values()) < 1e-9, max(errs.items(), key=lambda kv: kv[1])


def test_deformable_token_merging_eager_equals_op():
    """The unfused merging layer's deformable convolution against the oracle (and the fused op):
    fp64, every gradient, fractional offsets, offsets on integer points and far outside the map,
    an odd-sized map (the last row and column are dropped by the stride)."""
    B, C, H, W, O, k = 2, 5, 7, 9, 6, 2
    x = _x(B, C, H, W, seed=2)
    off = 2.5 * _x(B, 2 * k * k, H // k, W // k, seed=3)
    off[:, 1, 0] = torch.round(off[:, 1, 0])
    off[:, 2::4, -1] = -40.0
    weight, bias = _x(O, C, k, k, seed=4), _x(O, seed=5)

    def eager(x, off, w, b):
        return lit.deform_merge_eager(x, off, w, b, k)

    def oracle(x, off, w, b):
        return deform_oracle(x, off, w, b, stride=k)

    def fused(x, off, w, b):
        return tm.deform_conv2d(x, off, w, b, stride=k)

    check_against_oracle(eager, oracle, [x, off, weight, bias], F64)
    check_against_oracle(fused, eager, [x, off, weight, bias], F64)
    # The module: fused and unfused share parameters and buffers.
    mod = lit.DeformableTokenMerging(C, O, k)
    randomise(mod, _gen()).double().eval()
    with torch.no_grad():
        a = mod(x)
        mod.fused = False
        b = mod(x)
    assert a.shape == (B, (H // k) * (W // k), O)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lit_ti_full_size(oracle):
    """LIT-Ti, one eval forward in fp32 against the official network: fused at 224 x 224, and
    unfused built for 160 x 160 (the official code takes any multiple of 32, its positional
    embeddings sized at construction; the randomised weights of the 224 model, with the 160
    model's own positional embeddings)."""
    model = models.create("lit_ti").eval()
    model.load_state_dict(oracle.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=_gen(2))
    with torch.no_grad():
        feats = model.forward_features(x)
        out, out_ref = model.forward_head(feats), oracle.eval()(x)
    assert feats.shape == (1, 1 + 7 * 7, 512) and out.shape == (1, 1000)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * out_ref.abs().max().item())

    ref = official.lit_ti(img_size=160).eval()
    ref.load_state_dict({k: v for k, v in oracle.state_dict().items() if not k.startswith("pos_embed")}, strict=False)
    model = models.create("lit_ti", fused=False, img_size=160).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert model.pos_embed1.shape == (1, 40 * 40, 64) and model.pos_embed4.shape == (1, 5 * 5 + 1, 512)
    x = torch.randn(1, 3, 160, 160, generator=_gen(4))
    with torch.no_grad():
        out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * out_ref.abs().max().item())


def test_unfused_state_dict_loads_into_fused():
    """A state_dict saved (serialised) from the fused=False model loads strictly into the fused
    one and gives the same outputs; likewise a pickled, deepcopied model."""
    src = randomise(models.create("lit_ti", fused=False, num_classes=10, **SMALL), _gen()).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = models.create("lit_ti", num_classes=10, **SMALL).eval()
    dst.load_state_dict(torch.load(buf), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=_gen(1))
    with torch.no_grad():
        want = src(x)
        torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(dst)(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pickle.loads(pickle.dumps(dst))(x), want, rtol=1e-5, atol=1e-5)


# ---- options, timm, channels_last ------------------------------------------------------------------

def test_lit_options():
    """Drop-path rates rising linearly to drop_path_rate, headless, the timm interface, the
    smallest input (32 x 32: a 1 x 1 stage-4 map), input-size and configuration checks."""
    m = _small(num_classes=0, drop_path_rate=0.2)
    blocks = [*m.block1, *m.block2, *m.block3, *m.block4]
    assert isinstance(blocks[0].drop_path, nn.Identity) and blocks[-1].drop_path.p == pytest.approx(0.2)
    assert blocks[2].drop_path.p == pytest.approx(0.2 * 2 / 5)
    assert isinstance(m.head, nn.Identity) and "head.weight" not in m.state_dict()
    x = torch.randn(2, 3, 64, 64, generator=_gen())
    with torch.no_grad():
        feats = m.eval().forward_features(x)
        assert feats.shape == (2, 1 + 2 * 2, 32) and m(x).shape == (2, 32)
        assert torch.equal(m.forward_head(feats, pre_logits=True), m(x))
    m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m.num_features == 32 and m.num_classes == 7
    m.train()(x).sum().backward()  # stochastic depth in training
    m.set_grad_checkpointing()
    m.zero_grad()
    m.eval()(x).sum().backward()
    assert m.patch_embed2.dconv.conv_offset.weight.grad is not None
    tiny = models.create("lit_ti", img_size=32, embed_dims=[8, 16, 24, 32], num_heads=[1, 1, 1, 1],
                         mlp_ratios=[1, 1, 1, 1], depths=[1, 1, 1, 1], num_classes=5)
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(AssertionError, match="img_size"):
        m(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="multiple of 8 \\* patch_size"):
        lit.LIT(img_size=48)
    with pytest.raises(ValueError, match="per stage"):
        lit.LIT(depths=[1, 1, 1])
    with pytest.raises(ValueError, match="num_heads"):
        lit.Attention(30, num_heads=4)


def test_lit_small_variant_size():
    """The overrides the cross-model tests use: under 0.5 M parameters at 32 x 32 (and 64 x 64)."""
    small = dict(embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1],
                 num_classes=10)
    for size in (32, 64):
        m = models.create("lit_ti", img_size=size, **small)
        n = sum(p.numel() for p in m.parameters())
        assert n < 500_000, n
        assert m(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_lit_timm_and_channels_last():
    timm = pytest.importorskip("timm")
    assert "lit_ti" in timm.list_models("lit_*")
    model = timm.create_model("lit_ti", num_classes=10, drop_path_rate=0.1, **SMALL).eval()
    assert isinstance(model, lit.LIT) and model.num_classes == 10
    assert model.pretrained_cfg["architecture"] == "lit_ti" and model.pretrained_cfg["file"] == "lit_ti.pth"
    assert_channels_last_matches(model, torch.randn(2, 3, 64, 64, generator=_gen()), 10)


def test_library_does_not_import_the_oracle():
    """The model module imports no oracle (the modules it imports are covered by the package-wide
    check in test_models_hornet.py)."""
    tree = ast.parse(inspect.getsource(lit))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.startswith("tokenmix.reference")], imported
