"""The HAT-Net backbone (tokenmix.models.hatnet: hatnet_tiny) against the official network
re-implemented in tokenmix.reference.hatnet_official, and HierarchicalAttention's ``fused`` switch.

Each network comparison randomises the official network, loads its state_dict (official keys)
into the tokenmix network with strict=True, fused and unfused, and compares in fp64 the logits and
the gradient of every parameter, on a narrow, shallow HAT-Net (the same classes as HAT-Net-Tiny)
at 64 x 32; the full HAT-Net-Tiny runs one fp32 forward at 224 x 224 and at 221 x 448."""
from __future__ import annotations

import ast
import inspect
import io

import pytest
import torch
from torch import nn

import tokenmix.models as models
import tokenmix.models.hatnet as hatnet
import tokenmix.reference.hatnet_official as official
from conftest import (assert_channels_last_matches, check_against_oracle, seeded as _gen, seeded_randn as _x,
                      state_shapes as _shapes)
from tokenmix.bench.shift_modules import randomise

F64 = torch.float64
NAME = "hatnet_tiny"
# Parameters (the official README: 12.7 M).
PARAMS = 12_655_912
# A narrow, shallow HAT-Net for the numerics: 4 x 4 windows on a 16 x 8 map in stage 1 (2 x 2 in
# stages 2 and 3), 2 to 8 heads, the global-only stage 4; inputs as small as 32 x 32.
SMALL = dict(dims=[16, 32, 48, 64], head_dim=8, expansions=[2, 2, 2, 2], grid_sizes=[4, 2, 2, 1],
             ds_ratios=[8, 4, 2, 1], depths=[1, 2, 1, 1], kernel_sizes=[3, 5, 3, 3])





def _n_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


@pytest.fixture(scope="module")
def oracle() -> nn.Module:
    """The official HAT-Net-Tiny, randomised (fp32), built once (no test changes it)."""
    return randomise(official.hatnet_tiny(), _gen()).eval()


# ---- architecture -------------------------------------------------------------------------------

def test_hatnet_architecture_and_keys(oracle):
    assert NAME in models.list_models()
    model = models.create(NAME)
    assert isinstance(model, hatnet.HATNet) and model.num_classes == 1000 and model.num_features == 384
    # Official initialisation: GroupNorms at identity, zero biases, truncated normal (std 0.02)
    # weights for every conv and linear layer, depthwise convs included.
    blk = model.blocks[2][3]
    assert torch.all(blk.attn.norm.weight == 1) and torch.all(blk.conv.conv3[1].bias == 0)
    assert torch.all(blk.attn.qkv.bias == 0) and torch.all(model.classifier[1].bias == 0)
    for w in (blk.attn.kv.weight, blk.conv.conv1[1].weight, blk.conv.conv2[0].weight, model.classifier[1].weight):
        assert 0.015 < w.std().item() < 0.025 and w.abs().max().item() <= 2.0
    n = _n_params(model)
    print(f"{NAME}: {n / 1e6:.2f} M parameters")
    assert n == PARAMS == _n_params(oracle)
    # The same keys, in the same order, with the same shapes; strict loads both ways.
    assert list(model.state_dict()) == list(oracle.state_dict())
    assert _shapes(model) == _shapes(oracle)
    model.load_state_dict(oracle.state_dict(), strict=True)
    for k, v in oracle.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    oracle.load_state_dict(model.state_dict(), strict=True)  # the same values: the fixture stays as it was
    # Depths, widths, heads, windows, pooling, expansions.
    assert [len(s) for s in model.blocks] == [2, 2, 6, 3]
    for i, stage in enumerate(model.blocks):
        for b in stage:
            a = b.attn
            assert (a.num_heads, a.head_dim, a.grid_size) == ([1, 2, 5, 8][i], 48, [8, 7, 7, 1][i])
            assert b.conv.conv1[1].out_channels == [48, 96, 240, 384][i] * [8, 8, 4, 4][i]
            assert b.conv.conv2[0].kernel_size == (3, 3) and a.fused
            if i < 3:
                assert a.avg_pool.kernel_size == a.avg_pool.stride == [8, 4, 2][i]
            else:
                assert not hasattr(a, "q") and "blocks.3.0.attn.kv.weight" not in model.state_dict()
    assert model.default_cfg["file"] == "HAT-Net_Tiny.pth" and model.default_cfg["url"] == ""
    assert model.default_cfg["classifier"] == "classifier.1" and model.default_cfg["first_conv"] == "patch_embed.0"


# ---- HierarchicalAttention's fused switch ----------------------------------------------------------

@pytest.mark.parametrize("grid_size,ds_ratio,H,W", [(4, 2, 8, 12), (2, 3, 6, 4), (1, 1, 5, 3)])
def test_attention_fused_unfused_official(grid_size, ds_ratio, H, W):
    """One H-MHSA, fp64: fused, unfused and the official module, output and the gradients of the
    input and every parameter (pooling that does not divide the map included; proj_norm gets
    none in any of them)."""
    dim, head_dim = 12, 4
    ref = randomise(official.Attention(dim, head_dim, grid_size=grid_size, ds_ratio=ds_ratio), _gen())
    mods = {tag: hatnet.HierarchicalAttention(dim, head_dim, grid_size=grid_size, ds_ratio=ds_ratio, fused=tag)
            for tag in (True, False)}
    names = [n for n, _ in ref.named_parameters()]
    for m in mods.values():
        m.load_state_dict(ref.state_dict(), strict=True)
        assert [n for n, _ in m.named_parameters()] == names

    def run(mod):
        return lambda x, *ps: torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    params = [p.detach() for p in ref.parameters()]
    x = _x(2, dim, H, W)
    check_against_oracle(run(mods[True]), run(ref), [x] + params, F64)
    check_against_oracle(run(mods[False]), run(ref), [x] + params, F64)
    # Flipping the attribute switches a built module.
    m = mods[True].double()
    with torch.no_grad():
        a = m(x)
        m.fused = False
        torch.testing.assert_close(m(x), a, rtol=1e-12, atol=1e-12)


def test_attention_rejects_maps_not_tiled_by_the_windows():
    """The official local step reshapes the map into windows and fails when they do not tile it;
    the fused and unfused modules say so."""
    for fused in (True, False):
        m = hatnet.HierarchicalAttention(16, 8, grid_size=4, ds_ratio=2, fused=fused)
        with pytest.raises(ValueError, match="multiple of grid_size 4"):
            m(torch.randn(1, 16, 8, 6))
    with pytest.raises(ValueError, match="multiple of head_dim"):
        hatnet.HierarchicalAttention(20, 8)


# ---- numerics: fused, unfused and official --------------------------------------------------------

def _grad_errors(net: nn.Module, grads_ref: dict) -> dict:
    """Each parameter's gradient error against its own scale, floored at 1e-6 of the largest;
    parameters without a gradient in the reference (proj_norm) must have none either."""
    floor = 1e-6 * max(g.abs().max().item() for g in grads_ref.values() if g is not None)
    errs = {}
    for n, p in net.named_parameters():
        if grads_ref[n] is None:
            assert p.grad is None, f"{n}: a gradient the official network does not have"
            continue
        errs[n] = ((p.grad - grads_ref[n]).abs().max() / max(floor, grads_ref[n].abs().max().item())).item()
    return errs


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_hatnet_fused_equals_unfused_and_official(train):
    """Logits and every parameter gradient, fp64, batch 2 of 64 x 32 images, on the small HAT-Net
    (its stages see 16 x 8, 8 x 4, 4 x 2 and 2 x 1 maps: several windows, pooled keys and values,
    the global-only last stage)."""
    ref = randomise(official.HAT_Net(**SMALL), _gen()).double().train(train)
    nets = {"fused": hatnet.HATNet(**SMALL), "unfused": hatnet.HATNet(**SMALL, fused=False)}
    x = _x(2, 3, 64, 32)
    g = torch.randn(2, 1000, generator=_gen(5), dtype=F64)
    # The official head dropout (0.2) is the one random layer left at these settings: off.
    ref.classifier[0].p = 0.
    out_ref = ref(x)
    out_ref.backward(g)
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    assert grads_ref["blocks.0.0.attn.proj_norm.weight"] is None
    # Unused there and here; frozen here, so that DDP needs no find_unused_parameters.
    assert not any(p.requires_grad for n, p in nets["fused"].named_parameters() if "proj_norm" in n)
    outs, grads = {}, {}
    for tag, net in nets.items():
        net.load_state_dict(ref.state_dict(), strict=True)
        net.double().train(train)
        net.classifier[0].p = 0.
        out = net(x)
        out.backward(g)
        outs[tag], grads[tag] = out, {n: p.grad for n, p in net.named_parameters()}
        err = (out - out_ref).abs().max().item() / out_ref.abs().max().item()
        errs = _grad_errors(net, grads_ref)
        worst = max(errs, key=errs.get)
        print(f"{tag}: logits relative error {err:.1e}, worst gradient {worst} {errs[worst]:.1e}")
        assert err < 1e-10, f"{tag}: logits relative error {err:.3e}"
        assert errs[worst] < 1e-9, f"{tag}: grad {worst} relative error {errs[worst]:.3e}"
    errs = _grad_errors(nets["fused"], grads["unfused"])
    assert max(errs.values()) < 1e-9, max(errs.items(), key=lambda kv: kv[1])
    attns = {tag: [b.attn for s in net.blocks for b in s] for tag, net in nets.items()}
    assert all(m.fused for m in attns["fused"]) and not any(m.fused for m in attns["unfused"])


def test_hatnet_tiny_at_224_and_221x448(oracle):
    """The full HAT-Net-Tiny, fp32, eval, batch 1, against the official network: at 224 x 224 and
    at 221 x 448, a size the official code also takes (the stride-2 convs round 221 up to the 224
    maps; 448 doubles every window count and makes the maps non-square)."""
    model = models.create(NAME).eval()
    model.load_state_dict(oracle.state_dict(), strict=True)
    for size in [(224, 224), (221, 448)]:
        x = torch.randn(1, 3, *size, generator=_gen(2))
        with torch.no_grad():
            out_ref = oracle(x)
            feats = model.forward_features(x)
            out = model.forward_head(feats)
        assert feats.shape == (1, 384, 7, 7 * size[1] // 224) and out.shape == (1, 1000)
        scale = out_ref.abs().max().item()
        print(f"{size}: logits relative error {(out - out_ref).abs().max().item() / scale:.1e}")
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * scale)
    # At 256 x 256, stage 2's 32 x 32 map is not tiled by 7 x 7 windows: the official reshape
    # fails, the tokenmix model says why.
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            oracle(x)
        with pytest.raises(ValueError, match="grid_size 7"):
            model(x)


# ---- state_dict, options, timm, channels_last, packaging -----------------------------------------

def test_unfused_state_dict_loads_into_fused():
    unfused = randomise(hatnet.HATNet(**SMALL, fused=False), _gen()).eval()
    buf = io.BytesIO()
    torch.save(unfused.state_dict(), buf)
    buf.seek(0)
    fused = hatnet.HATNet(**SMALL).eval()
    fused.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = _x(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-5)


def test_hatnet_options():
    """Drop-path rates rising linearly to drop_path_rate, channel dropout, the headless model,
    the timm interface, gradient checkpointing, the small model's smallest input (29 x 29: the
    stride-2 convs round it up to the maps of 32 x 32), the bad configurations."""
    m = models.create(NAME, num_classes=0, drop_path_rate=0.2, drop_rate=0.1, **SMALL)
    blocks = [b for s in m.blocks for b in s]
    assert isinstance(blocks[0].drop_path, nn.Identity) and blocks[-1].drop_path.p == pytest.approx(0.2)
    assert blocks[2].drop_path.p == pytest.approx(0.1) and blocks[1].attn.drop.p == 0.1
    assert "classifier.1.weight" not in m.state_dict() and isinstance(m.head, nn.Identity)
    x = _x(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        feats = m.eval().forward_features(x)
        assert feats.shape == (2, 64, 1, 1) and m(x).shape == (2, 64)
        assert torch.equal(m.forward_head(feats, pre_logits=True), m(x))
        torch.testing.assert_close(m(x), feats.mean((2, 3)))
        assert m(x[..., :29, :30]).shape == (2, 64)
        with pytest.raises(ValueError, match="grid_size 4"):
            m(x[..., :28, :32])
    m.reset_classifier(7)
    assert m.get_classifier() is m.head is m.classifier[1] and m.head.out_features == 7 and m.num_classes == 7
    assert m.num_features == 64 and list(m.state_dict())[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    m.train()(x).sum().backward()  # stochastic depth and dropout in training
    assert _n_params(m) < 500_000
    # Gradient checkpointing recomputes the blocks: the same gradients.
    net = randomise(hatnet.HATNet(**SMALL), _gen()).double()  # eval below: no random layer
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.eval().set_grad_checkpointing(ckpt)
        net(_x(1, 3, 32, 32)).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="per stage"):
        hatnet.HATNet(depths=[1, 1, 1])


def test_hatnet_timm_channels_last_autocast():
    timm = pytest.importorskip("timm")
    assert NAME in timm.list_models("hatnet*")
    model = timm.create_model(NAME, num_classes=10, drop_path_rate=0.1, **SMALL).eval()
    assert isinstance(model, hatnet.HATNet) and model.num_classes == 10
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["architecture"] == NAME
    randomise(model, _gen())
    x = _x(2, 3, 64, 64, dtype=torch.float32)
    a = assert_channels_last_matches(model, x, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c = model(x)
    assert c.dtype == torch.bfloat16
    torch.testing.assert_close(c.float(), a, rtol=0.1, atol=0.1 * a.abs().max().item())


def test_library_does_not_import_the_oracle():
    """The model module imports no oracle (test_models_hornet checks the rest of tokenmix.models
    and tokenmix.nn in a fresh interpreter)."""
    tree = ast.parse(inspect.getsource(hatnet))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "tokenmix.ops.window_attention" in imported
    assert not [m for m in imported if m.startswith("tokenmix.reference")], imported
