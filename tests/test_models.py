"""What every backbone in tokenmix.models owes its users, checked on each registered model's narrow
variant (the same code at a fraction of the width and depth; each model's own test file checks the
full-size architecture against the official network): official checkpoints loading from a local
file through timm and tokenmix, the usual load_state_dict errors, fused and unfused training alike
for 20 SGD steps, torch.compile, deepcopy, channels_last, autocast and gradient checkpointing."""
from __future__ import annotations

import argparse
import copy
import os

import pytest
import torch
from torch import nn

import tokenmix.models as models
from tokenmix.bench.shift_modules import randomise

# Per model: constructor overrides giving a narrow variant, and its input size.
SMALL = {
    "hatnet_tiny": (dict(dims=[16, 32, 48, 64], head_dim=8, expansions=[2, 2, 2, 2], grid_sizes=[4, 2, 2, 1],
                         depths=[1, 1, 2, 1]), 32),
    "dynamicvit_deit_small": (dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                                   pruning_loc=(1, 2, 3)), 32),
    "hire_mlp_tiny": (dict(layers=[1, 1, 2, 1], embed_dims=[16, 32, 48, 64]), 64),
    "hornet_tiny_7x7": (dict(depths=[1, 1, 2, 1], base_dim=8), 32),
    "hornet_tiny_gf": (dict(depths=[1, 1, 2, 1], base_dim=8), 32),
    "lit_ti": (dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                    depths=[1, 1, 1, 1]), 64),
}
NAMES = sorted(SMALL)


def _small(name: str, fused: bool = True, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, fused=fused, num_classes=10, **{**SMALL[name][0], **kwargs})


def _x(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = SMALL[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_every_model_is_covered():
    assert set(models.list_models()) == set(SMALL), "add the new model's narrow variant to SMALL"


# ---- checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_from_a_local_file(name, tmp_path, monkeypatch):
    """An official training checkpoint (state_dict under ``model``, beside ``args`` and ``epoch``)
    loads through timm's ``pretrained=True`` (the cfg's ``file``, found in $TOKENMIX_CHECKPOINTS
    or given by ``pretrained_cfg_overlay``), timm's ``checkpoint_path=`` and tokenmix's
    ``create(checkpoint_path=)``; nothing is downloaded."""
    timm = pytest.importorskip("timm")
    src = randomise(_small(name), torch.Generator().manual_seed(3))
    cfg = src.pretrained_cfg
    assert cfg["url"] == "" and cfg["file"].endswith(".pth") and timm.is_model(name)
    path = tmp_path / cfg["file"]
    torch.save({"model": src.state_dict(), "epoch": 299, "args": argparse.Namespace(model=name)}, path)
    small = dict(num_classes=10, **SMALL[name][0])

    monkeypatch.delenv("TOKENMIX_CHECKPOINTS", raising=False)
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        timm.create_model(name, pretrained=True, **small)
    monkeypatch.setenv("TOKENMIX_CHECKPOINTS", str(tmp_path))
    _same_state(timm.create_model(name, pretrained=True, **small), src)
    monkeypatch.delenv("TOKENMIX_CHECKPOINTS")
    _same_state(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small), src)
    _same_state(timm.create_model(name, checkpoint_path=str(path), **small), src)
    _same_state(models.create(name, checkpoint_path=str(path), **small), src)

    # A DistributedDataParallel save (``module.`` prefix) and a bare state_dict load too.
    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, ddp)
    _same_state(models.create(name, checkpoint_path=str(ddp), **small), src)
    # Another class count: the checkpoint's classifier is skipped, every other tensor loads.
    other = models.create(name, checkpoint_path=str(path), **dict(small, num_classes=7))
    assert other.get_classifier().out_features == 7
    head = cfg["classifier"] + "."
    for k, v in src.state_dict().items():
        if not k.startswith(head):
            assert torch.equal(other.state_dict()[k], v), k


@pytest.mark.parametrize("name", NAMES)
def test_bad_state_dicts_raise_the_usual_errors(name, tmp_path):
    model = _small(name)
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.dim() > 1 and not k.startswith(model.pretrained_cfg["classifier"]))
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(missing)
    reshaped = dict(state, **{key: state[key].new_zeros(state[key].shape[0] + 1, *state[key].shape[1:])})
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(reshaped)
    path = tmp_path / "bad.pth"
    torch.save({"model": missing}, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        models.load_checkpoint(model, str(path))


# ---- fused vs unfused ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fused_and_unfused_train_alike(name):
    """20 SGD steps on a fixed synthetic batch from the same weights: the same loss curve (fp32),
    and the unfused model's state_dict gives the fused one the same outputs."""
    x = _x(name, batch=4)
    y = torch.arange(4) % 10
    curves = {}
    nets = {}
    for fused in (True, False):
        net = _small(name, fused=fused)
        net.load_state_dict(randomise(_small(name), torch.Generator().manual_seed(5)).state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        curve = []
        for step in range(20):
            torch.manual_seed(100 + step)
            loss = nn.functional.cross_entropy(net.train()(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[fused], nets[fused] = curve, net
    assert curves[True][-1] < curves[True][0]
    for a, b in zip(curves[True], curves[False]):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-4), (curves[True], curves[False])
    fused = _small(name)
    fused.load_state_dict(nets[False].state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), nets[False].eval()(x), rtol=1e-4, atol=1e-4)


# ---- an ordinary nn.Module -------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_compile_traces_without_graph_breaks(name):
    """torch.compile(fullgraph=True) of the whole model matches eager, eval forward and train
    forward+backward; the AOT-eager backend (what inductor receives, without its CPU codegen, too
    slow on a 2-core machine for every model: one model runs inductor below)."""
    _compiled_matches_eager(name, "aot_eager")


def test_compile_inductor():
    _compiled_matches_eager("hornet_tiny_7x7", "inductor", depths=[1, 1, 1, 1])


def _compiled_matches_eager(name: str, backend: str, **overrides) -> None:
    torch._dynamo.reset()
    model = randomise(_small(name, **overrides), torch.Generator().manual_seed(2))
    x = _x(name)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    compiled.train()(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.manual_seed(0)
    model(x).square().sum().backward()
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_channels_last_autocast_checkpointing(name):
    model = randomise(_small(name), torch.Generator().manual_seed(2)).eval()
    x = _x(name)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), ref)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert low.shape == ref.shape and torch.isfinite(low).all()
        torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())

    # Gradient checkpointing recomputes activations in backward: the same gradients.
    model.train()
    grads = {}
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad()
        torch.manual_seed(0)
        model(x).square().sum().backward()
        grads[on] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
