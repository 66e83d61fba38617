"""DynamicViT-DeiT-S (tokenmix.models.dynamicvit: dynamicvit_deit_small) against the official
network re-implemented in tokenmix.reference.dynamicvit_official, fused (policy_softmax,
topk_tokens) and unfused (the official eager softmax and argsort + batch_index_select).

Numerics run in fp64 on a small variant of the same code (32 x 32 images, 4 x 4 patches, width
32, depth 4, predictors before blocks 1, 2 and 3): the tokenmix networks load the randomised
oracle's state_dict (official keys) with strict=True and are compared on the logits, the
official training outputs (features, decisions) and the gradient of every parameter, in
training (hard Gumbel decisions drawn after the same torch.manual_seed) and in eval (top-k
pruning). The full-size model runs one fp32 forward at 224 x 224 and one at 160 x 160."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import seeded as _gen, seeded_randn as _x, state_shapes as _shapes
import tokenmix.models as models
import tokenmix.models.dynamicvit as dynamicvit
import tokenmix.reference.dynamicvit_official as official
from tokenmix.bench.shift_modules import randomise

F64 = torch.float64
NAME = "dynamicvit_deit_small"
# DeiT-S (22,050,664) plus three score predictors of 241,250 each.
PARAMS = 22_774_414
# The small variant: 64 patch tokens, 44, 31 and 21 kept in eval.
SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, pruning_loc=(1, 2, 3))





def _small_oracle(**kwargs) -> nn.Module:
    """The official network in the small configuration (DeiT-S's keep ratios), randomised, fp64."""
    return randomise(official.dynamicvit_deit_small(**{**SMALL, **kwargs}), _gen()).double()


def _small_pair(ref: nn.Module) -> dict:
    """Unfused model loaded from the oracle's state_dict, and the fused model loaded from the
    unfused one's (both strict), fp64."""
    unfused = models.create(NAME, fused=False, **SMALL).double()
    unfused.load_state_dict(ref.state_dict(), strict=True)
    fused = models.create(NAME, **SMALL).double()
    fused.load_state_dict(unfused.state_dict(), strict=True)
    return {"fused": fused, "unfused": unfused}


def _grad_errors(net: nn.Module, ref: nn.Module) -> dict:
    """Each parameter's gradient error against its own scale, floored at 1e-6 of the largest;
    parameters without a gradient must have none on both sides."""
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    floor = 1e-6 * max(g.abs().max().item() for g in grads_ref.values() if g is not None)
    errs = {}
    for n, p in net.named_parameters():
        if grads_ref[n] is None:
            assert p.grad is None, f"{n}: gradient where the oracle has none"
            continue
        errs[n] = ((p.grad - grads_ref[n]).abs().max() / max(floor, grads_ref[n].abs().max().item())).item()
    return errs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(scope="module")
def full_model() -> nn.Module:
    """The full-size tokenmix model as built (official initialisation), built once; tests take a
    deepcopy before changing it."""
    return models.create(NAME)


@pytest.fixture(scope="module")
def oracle() -> nn.Module:
    """The full-size official network, randomised (fp32), built once; tests take a deepcopy
    before changing it."""
    return randomise(official.dynamicvit_deit_small(), _gen())


# ---- architecture -------------------------------------------------------------------------------

def test_architecture_and_keys(oracle, full_model):
    assert NAME in models.list_models()
    model = copy.deepcopy(full_model)
    # Official initialisation: truncated normal (std 0.02) Linear weights and embeddings, zero
    # biases, LayerNorms at identity (eps 1e-6 in the network, the default 1e-5 in the predictors).
    blk, pred = model.blocks[4], model.score_predictor[1]
    assert 0.015 < blk.attn.qkv.weight.std().item() < 0.025 and torch.all(blk.attn.qkv.bias == 0)
    assert 0.015 < model.pos_embed.std().item() < 0.025 and model.pos_embed.abs().max() <= 2
    assert torch.all(blk.norm1.weight == 1) and torch.all(pred.in_conv[0].bias == 0)
    assert blk.norm1.eps == 1e-6 and model.norm.eps == 1e-6 and pred.in_conv[0].eps == 1e-5
    assert torch.all(pred.out_conv[4].bias == 0) and 0.01 < pred.out_conv[0].weight.std().item() < 0.03
    n = sum(p.numel() for p in model.parameters())
    print(f"{NAME}: {n / 1e6:.2f} M parameters")
    assert n == PARAMS == sum(p.numel() for p in oracle.parameters())
    # The same keys in the same order (an official optimizer state maps onto ours), the same
    # shapes; strict loads both ways.
    assert list(model.state_dict()) == list(oracle.state_dict()) and _shapes(model) == _shapes(oracle)
    model.load_state_dict(oracle.state_dict(), strict=True)
    for k, v in oracle.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    copy.deepcopy(oracle).load_state_dict(model.state_dict(), strict=True)
    # DeiT-S with predictors before blocks 3, 6, 9 keeping 137, 96, 67 of the 196 patches.
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads) == (12, 384, 6)
    assert model.pruning_loc == [3, 6, 9] and model.num_keep == [137, 96, 67] and model.distill
    assert model.patch_embed.proj.stride == (16, 16) and model.pos_embed.shape == (1, 197, 384)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    cfg = dynamicvit.default_cfgs[NAME]
    assert cfg["url"] == "" and cfg["file"].endswith(".pth") and model.pretrained_cfg["architecture"] == NAME


# ---- numerics: fused, unfused and official, fp64 on the small variant ------------------------------

def test_small_train_matches_official():
    """Training mode: the same Gumbel decisions after the same seed, then logits, features,
    decisions and the gradient of every parameter, through a loss with DynamicViT's terms
    (classification, token distillation, keep ratio)."""
    ref = _small_oracle().train()
    nets = _small_pair(ref)
    x = _x(3, 3, 32, 32)
    g, h = _x(3, 1000, seed=2), _x(3, 64, 32, seed=3)

    def loss(out):
        logits, features, decision, keeps = out
        ratio = sum(((k.mean(1) - r) ** 2).sum() for k, r in zip(keeps, (0.7, 0.49, 0.343)))
        return (logits * g).sum() + (features * h).sum() + ratio

    torch.manual_seed(7)
    out_ref = ref(x)
    loss(out_ref).backward()
    keeps_ref = out_ref[3]
    # The decisions are a real mix of kept and dropped tokens, dropped ones staying dropped.
    for k in keeps_ref:
        assert set(k.unique().tolist()) == {0.0, 1.0}
    assert torch.all(keeps_ref[2] <= keeps_ref[1]) and torch.all(keeps_ref[1] <= keeps_ref[0])
    outs = {}
    for tag, net in nets.items():
        net.train()
        torch.manual_seed(7)
        out = net(x, return_aux=True)
        loss(out).backward()
        outs[tag] = out
        logits, features, decision, keeps = out
        for a, b in zip(keeps, keeps_ref):
            assert torch.equal(a, b), f"{tag}: decisions differ"
        assert torch.equal(decision, out_ref[2]) and not decision.requires_grad
        errs = _grad_errors(net, ref)
        worst = max(errs, key=errs.get)
        err = max(_rel(logits, out_ref[0]), _rel(features, out_ref[1]))
        print(f"train {tag}: logits/features relative error {err:.1e}, worst gradient {worst} {errs[worst]:.1e}")
        assert err < 1e-10, f"{tag}: logits/features relative error {err:.3e}"
        assert errs[worst] < 1e-9, f"{tag}: grad {worst} relative error {errs[worst]:.3e}"
        assert errs["score_predictor.0.in_conv.1.weight"] < 1e-9  # the straight-through gradient
    # The fused model (loaded from the unfused one's state_dict) against the unfused one.
    for a, b in zip(outs["fused"][:2], outs["unfused"][:2]):
        assert _rel(a, b) < 1e-10
    # A plain call returns the logits only, the same ones.
    torch.manual_seed(7)
    with torch.no_grad():
        torch.testing.assert_close(nets["fused"](x), outs["fused"][0], rtol=0, atol=0)


def test_small_eval_matches_official():
    """Eval mode: top-k pruning to 44, 31, 21 tokens, logits and the gradient of every parameter
    (none for the predictors: the selection is not differentiable, in the official code too)."""
    ref = _small_oracle().eval()
    nets = _small_pair(ref)
    x = _x(3, 3, 32, 32)
    g = _x(3, 1000, seed=2)
    out_ref = ref(x)
    out_ref.backward(g)
    outs = {}
    for tag, net in nets.items():
        net.eval()
        assert net.num_keep == [44, 31, 21]
        out = outs[tag] = net(x)
        out.backward(g)
        errs = _grad_errors(net, ref)
        worst = max(errs, key=errs.get)
        print(f"eval {tag}: logits relative error {_rel(out, out_ref):.1e}, worst gradient {worst} {errs[worst]:.1e}")
        assert _rel(out, out_ref) < 1e-10
        assert errs[worst] < 1e-9, f"{tag}: grad {worst} relative error {errs[worst]:.3e}"
        assert net.score_predictor[0].in_conv[1].weight.grad is None
        with torch.no_grad():
            assert net.forward_features(x).shape == (3, 22, 32)
            assert torch.equal(net(x, return_aux=True), out.detach())
    assert _rel(outs["fused"], outs["unfused"]) < 1e-10


def test_eval_ties_keep_the_lower_positions():
    """All scores equal (the predictors' last layer zeroed): topk_tokens keeps the lowest
    positions, and the unfused path's stable sort the same ones."""
    ref = _small_oracle().eval()
    with torch.no_grad():
        for pred in ref.score_predictor:
            pred.out_conv[4].weight.zero_()
    nets = _small_pair(ref)
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        feats = {tag: net.eval().forward_features(x) for tag, net in nets.items()}
        torch.testing.assert_close(feats["fused"], feats["unfused"], rtol=1e-12, atol=1e-12)
        # The same as a network that keeps the first 44, then 31, then 21 patch tokens.
        net = nets["fused"]
        t = net.patch_embed(x)
        t = torch.cat((net.cls_token.expand(2, -1, -1), t), dim=1) + net.pos_embed
        for (lo, hi), k in zip(net._segments, [None, *net.num_keep]):
            t = t if k is None else t[:, :1 + k]
            for blk in net.blocks[lo:hi]:
                t = blk(t)
    torch.testing.assert_close(feats["fused"], net.norm(t), rtol=1e-12, atol=1e-12)


def test_full_size_fp32(oracle, full_model):
    """The full-size model, fp32, batch 1, 224 x 224: eval (fused and unfused) and one training
    forward (the same decisions) against the official network."""
    model = copy.deepcopy(full_model).eval()
    model.load_state_dict(oracle.state_dict(), strict=True)
    ref = oracle.eval()
    x = torch.randn(1, 3, 224, 224, generator=_gen(2))
    with torch.no_grad():
        out_ref = ref(x)
        feats = model.forward_features(x)
        out = model.forward_head(feats)
        model.fused = False
        out_unfused = model(x)
        model.fused = True
        assert feats.shape == (1, 68, 384) and out.shape == (1, 1000)
        scale = out_ref.abs().max().item()
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(out_unfused, out_ref, rtol=1e-4, atol=1e-4 * scale)
        torch.manual_seed(3)
        train_ref = ref.train()(x)
        torch.manual_seed(3)
        train_out = model.train()(x, return_aux=True)
    for a, b in zip(train_out[3], train_ref[3]):
        assert torch.equal(a, b)
    assert train_out[1].shape == (1, 196, 384) and train_out[2].shape == (1, 196, 1)
    torch.testing.assert_close(train_out[0], train_ref[0], rtol=1e-4, atol=1e-4 * scale)


def test_other_input_size():
    """``img_size`` sizes the position embedding and the token counts: 40 x 40 images of 4 x 4
    patches (100 tokens; the official int(100 * 0.7**k) keeps 70, 48, 34, as 0.7**2 is
    0.48999... in floating point), fp64 against the official network built with the same
    img_size (whose forward, unlike the official one, takes the patch count from it). The input
    must have exactly img_size, as in the official code."""
    ref = _small_oracle(img_size=40)
    model = models.create(NAME, **{**SMALL, "img_size": 40}).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert model.pos_embed.shape == (1, 101, 32) and model.num_keep == [70, 48, 34]
    x = _x(2, 3, 40, 40)
    with torch.no_grad():
        out_ref = ref.eval()(x)
        assert _rel(model.eval()(x), out_ref) < 1e-10
        assert model.forward_features(x).shape == (2, 35, 32)
        torch.manual_seed(2)
        out_ref = ref.train()(x)
        torch.manual_seed(2)
        out = model.train()(x, return_aux=True)
        assert _rel(out[0], out_ref[0]) < 1e-10 and torch.equal(out[2], out_ref[2])
        with pytest.raises(ValueError, match="img_size"):
            model(_x(2, 3, 32, 32))


# ---- options ------------------------------------------------------------------------------------

def test_options():
    """Drop-path rates, headless model, reset_classifier, pre_logits, representation layer,
    non-distilled outputs, the fused property, gradient checkpointing, argument checks."""
    m = models.create(NAME, num_classes=0, drop_path_rate=0.2, drop_rate=0.1, **SMALL)
    assert isinstance(m.blocks[0].drop_path, nn.Identity) and m.blocks[-1].drop_path.p == pytest.approx(0.2)
    x = torch.randn(2, 3, 32, 32, generator=_gen())
    with torch.no_grad():
        m.eval()
        assert m(x).shape == (2, 32) and m.num_features == 32
        assert torch.equal(m.forward_head(m.forward_features(x), pre_logits=True), m(x))
    m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m(x).shape == (2, 7)
    m.train()(x).sum().backward()  # stochastic depth and dropout in training

    # Representation layer: official keys pre_logits.fc.*, num_features its width.
    rep = models.create(NAME, representation_size=48, **SMALL)
    rep_ref = official.dynamicvit_deit_small(representation_size=48, **SMALL)
    assert list(rep.state_dict()) == list(rep_ref.state_dict()) and _shapes(rep) == _shapes(rep_ref)
    assert rep.num_features == 48 and rep.head.in_features == 48

    # Without distill, the official training outputs are (logits, decisions).
    nd = models.create(NAME, distill=False, **SMALL).double()
    nd_ref = official.dynamicvit_deit_small(distill=False, **SMALL).double()
    nd.load_state_dict(randomise(nd_ref, _gen()).state_dict(), strict=True)
    xd = _x(2, 3, 32, 32)
    torch.manual_seed(1)
    out = nd.train()(xd, return_aux=True)
    torch.manual_seed(1)
    out_ref = nd_ref.train()(xd)
    assert len(out) == len(out_ref) == 2 and len(out[1]) == 3 and out[1][0].shape == (2, 64)
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-10, atol=1e-10)

    # Gradient checkpointing: the same logits and gradients (the Gumbel draws happen outside the
    # checkpointed blocks; the recomputation restores the RNG state for dropout and drop path).
    ck = models.create(NAME, drop_path_rate=0.1, **SMALL).double()
    randomise(ck, _gen())
    runs = []
    for enable in (False, True):
        ck.zero_grad()
        ck.set_grad_checkpointing(enable)
        torch.manual_seed(5)
        out = ck.train()(xd)
        out.sum().backward()
        runs.append((out.detach(), [p.grad.clone() for p in ck.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    # The fused property switches every attention; deepcopy keeps it.
    m.fused = False
    assert not any(b.attn.fused for b in m.blocks) and not copy.deepcopy(m).fused

    with pytest.raises(ValueError, match="pruning_loc"):
        models.create(NAME, depth=3, pruning_loc=(1, 2, 3))
    with pytest.raises(ValueError, match="pruning_loc"):
        models.create(NAME, pruning_loc=(6, 3, 9))
    with pytest.raises(ValueError, match="one entry per predictor"):
        models.create(NAME, token_ratio=(0.5, 0.25))
    with pytest.raises(ValueError, match="token_ratio"):
        models.create(NAME, token_ratio=(0.5, 0.0, 0.1))


def test_channels_last_autocast_compile():
    """On the small variant: channels_last input, CPU bf16 autocast (training and eval, forward
    and backward), and torch.compile(fullgraph=True) of the fused eval path."""
    m = randomise(models.create(NAME, **SMALL), _gen()).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen())
    with torch.no_grad():
        a = m(x)
        b = m(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for train in (True, False):
        m.train(train)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().sum().backward()
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), a, rtol=1e-5, atol=1e-5)


def test_timm():
    timm = pytest.importorskip("timm")
    assert NAME in timm.list_models("dynamicvit*")
    model = timm.create_model(NAME, num_classes=10, **SMALL)
    assert isinstance(model, dynamicvit.DynamicViT) and model.num_classes == 10
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["architecture"] == NAME


def test_library_does_not_import_the_oracle():
    code = ("import sys, tokenmix.models.dynamicvit; "
            "print(any(k.startswith('tokenmix.reference') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
