"""Accelerated timm models are ordinary timm models: the model-level checks timm makes of its own
models (forward, backward, default cfgs, set_input_size, FX, TorchScript, tracing, pickling), and
what users do with models (deepcopy, dtype casts, torch.compile, torch.export, gradient
checkpointing, DDP), on accelerated Swin v1, Swin S3 and GC ViT with random weights and small
images."""
from __future__ import annotations

import copy
import functools
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tokenmix
from conftest import DEVICES, assert_close_to_exact

try:
    import timm
    from timm.models.gcvit import GlobalContextVitBlock
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names
except Exception as exc:  # not installed, or a torchvision that does not match this torch
    pytest.skip(f"timm unavailable: {exc}", allow_module_level=True)

pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

SWINS = ["swin_tiny_patch4_window7_224", "swin_s3_tiny_224"]
MODELS = SWINS + ["gcvit_xxtiny"]
BLOCK_TYPES = {"swin_tiny_patch4_window7_224": SwinTransformerBlock,
               "swin_s3_tiny_224": SwinTransformerBlock, "gcvit_xxtiny": GlobalContextVitBlock}

SIZE = 64
# At 64 px the first two Swin stages (16 x 16 and 8 x 8 tokens, window 7) are padded and shifted.
# Swin is built with strict_img_size=False so that it also runs at OTHER_SIZE, where every stage
# of a window-4 Swin pads; timm's GC ViT runs only at the size it was built for.
OTHER_SIZE = (72, 96)
KWARGS = {name: dict(img_size=SIZE, drop_path_rate=0.0, strict_img_size=False) for name in SWINS}
KWARGS["gcvit_xxtiny"] = dict(img_size=SIZE, drop_path_rate=0.0)

RTOL, ATOL = 1e-4, 1e-5  # accelerated vs plain timm (different summation order)


@functools.lru_cache(maxsize=None)
def _built(name: str, overrides: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**KWARGS[name], **dict(overrides)})


def _models(name: str, device: str = "cpu", **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain, accelerated) copies of one randomly initialised timm model, in eval mode."""
    plain = copy.deepcopy(_built(name, tuple(sorted(overrides.items())))).to(device).eval()
    acc = tokenmix.accelerate(copy.deepcopy(plain))
    assert acc.tokenmix_report and all(r.replaced for r in acc.tokenmix_report)
    return plain, acc


def _input(*shape: int, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device)


def _image(device: str = "cpu", size: tuple[int, int] = (SIZE, SIZE), batch: int = 2) -> torch.Tensor:
    return _input(batch, 3, *size, device=device)


def _blocks(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES[name])]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual: dict, expected: dict, rtol: float = 1e-3, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for n in actual:
        torch.testing.assert_close(actual[n], expected[n], rtol=rtol, atol=atol, msg=n)


def _calls_tokenmix(graph: torch.fx.Graph) -> bool:
    return any("tokenmix" in str(n.target) for n in graph.nodes if n.op == "call_function")


# ---- forward, backward, cfgs ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name, device):
    plain, acc = _models(name, device)
    plain.train()
    acc.train()
    blocks = _blocks(acc, name)
    assert blocks and all(type(b).__module__ == "tokenmix.accelerate" for b in blocks)
    x = _image(device)
    ref = plain(x)
    ref.square().mean().backward()
    out = acc(x)
    out.square().mean().backward()
    assert out.shape == (2, plain.num_classes)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    _assert_same_grads(_grads(acc), _grads(plain))


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_and_classifier(name):
    plain, acc = _models(name)
    assert acc.pretrained_cfg == plain.pretrained_cfg and acc.default_cfg == plain.default_cfg
    assert acc.pretrained_cfg["architecture"] == name
    assert acc.num_classes == plain.num_classes == 1000
    x = _image()
    with torch.no_grad():
        feats = acc.forward_features(x)
        torch.testing.assert_close(feats, plain.forward_features(x), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(acc.forward_head(feats), acc(x))
        assert acc.forward_head(feats, pre_logits=True).shape == (2, acc.num_features)
        acc.reset_classifier(7)
        assert acc.num_classes == 7 and acc.get_classifier().out_features == 7
        assert acc(x).shape == (2, 7)
        acc.reset_classifier(0)
        assert acc(x).shape == (2, acc.num_features)


# ---- set_input_size -------------------------------------------------------------------------

# Each case is a sequence of set_input_size calls; the second call of "non-square" resizes from a
# non-square window, which timm resamples differently from a square one.
SET_INPUT_SIZE = {
    "img-size": [dict(img_size=96)],
    "non-square": [dict(img_size=(64, 96), window_size=(3, 5)), dict(img_size=80, window_size=4)],
    "always-partition": [dict(window_size=5, always_partition=True)],
    "window-ratio": [dict(window_ratio=4)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(SET_INPUT_SIZE))
@pytest.mark.parametrize("name", MODELS)
def test_set_input_size_matches_timm(name, case, device):
    """After the same set_input_size calls, the accelerated model has the plain model's windows,
    shifts, (resampled) parameters and outputs."""
    plain, acc = _models(name, device)
    if not hasattr(plain, "set_input_size"):
        pytest.skip(f"timm's {type(plain).__name__} has no set_input_size")
    for call in SET_INPUT_SIZE[case]:
        plain.set_input_size(**call)
        acc.set_input_size(**call)
        expected, actual = plain.state_dict(), acc.state_dict()
        assert actual.keys() == expected.keys()
        for k in expected:
            assert torch.equal(actual[k], expected[k]), k
        for p, a in zip(_blocks(plain, name), _blocks(acc, name)):
            assert (a.window_size, a.shift_size) == (p.window_size, p.shift_size)
            assert (a.attn.window_size, a.attn.shift_size) == (tuple(p.window_size), tuple(p.shift_size))
        x = _image(device, tuple(plain.patch_embed.img_size))
        with torch.no_grad():
            torch.testing.assert_close(acc(x), plain(x), rtol=RTOL, atol=ATOL)


# ---- FX, TorchScript, tracing ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_fx_symbolic_trace(name, device):
    """torch.fx.symbolic_trace, and timm's own FX feature extraction (its leaf modules and
    autowrapped functions), trace through the fused attention and give the eager outputs."""
    _, acc = _models(name, device)
    x = _image(device)
    graph_module = torch.fx.symbolic_trace(acc)
    assert _calls_tokenmix(graph_module.graph)
    _, eval_nodes = get_graph_node_names(acc)
    extractor = create_feature_extractor(acc, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        ref = acc(x)
        torch.testing.assert_close(graph_module(x), ref)
        torch.testing.assert_close(extractor(x)[eval_nodes[-1]], ref)
        if name in SWINS:  # the graph pads as the input size requires
            x2 = _image(device, OTHER_SIZE)
            torch.testing.assert_close(graph_module(x2), acc(x2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name, device):
    plain, acc = _models(name, device)
    try:
        torch.jit.script(plain)
    except Exception as exc:
        pytest.skip(f"timm's plain {name} does not script: {exc}")
    scripted = torch.jit.script(acc)
    sizes = [(SIZE, SIZE), OTHER_SIZE] if name in SWINS else [(SIZE, SIZE)]
    with torch.no_grad():
        for size in sizes:
            x = _image(device, size)
            torch.testing.assert_close(scripted(x), acc(x))
            torch.testing.assert_close(scripted(x), plain(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_jit_trace_then_other_size(name, device):
    """Traced at a size that needs no padding, run at one that pads every Swin stage (shifted and
    not): the padding is recorded as a function of the input size, as in timm's trace."""
    overrides = dict(window_size=4) if name in SWINS else {}
    plain, acc = _models(name, device, **overrides)
    x, x2 = _image(device, batch=1), _image(device, OTHER_SIZE, batch=1)
    with torch.no_grad():
        plain_traced = torch.jit.trace(plain, x, check_trace=False)
        try:
            expected = plain(x2)
            torch.testing.assert_close(plain_traced(x2), expected)
        except Exception as exc:
            pytest.skip(f"timm's plain {name} traced at {SIZE} does not run at {OTHER_SIZE}: {exc}")
        traced = torch.jit.trace(acc, x, check_trace=False)
        torch.testing.assert_close(traced(x), acc(x))
        torch.testing.assert_close(traced(x2), acc(x2))
        torch.testing.assert_close(traced(x2), expected, rtol=RTOL, atol=ATOL)


# ---- pickling, copies, dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_pickle_and_torch_save_round_trip(name, device):
    _, acc = _models(name, device)
    x = _image(device)
    with torch.no_grad():
        ref = acc(x)
    buffer = io.BytesIO()
    torch.save(acc, buffer)
    buffer.seek(0)
    restored = [pickle.loads(pickle.dumps(acc)), torch.load(buffer, weights_only=False)]
    for model in restored:
        assert [type(b) for b in _blocks(model, name)] == [type(b) for b in _blocks(acc, name)]
        assert model.pretrained_cfg == acc.pretrained_cfg
        with torch.no_grad():
            assert torch.equal(model(x), ref)


def test_torch_load_in_a_fresh_process(tmp_path):
    """The fused classes are found by name in a process that never called accelerate."""
    path = tmp_path / "model.pt"
    x = _image(batch=1)
    models = [_models(name)[1] for name in MODELS]
    with torch.no_grad():
        torch.save({"models": models, "x": x, "outputs": [m(x) for m in models]}, path)
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad():\n"
        "    for model, ref in zip(saved['models'], saved['outputs']):\n"
        "        assert torch.equal(model(saved['x']), ref), type(model).__name__\n"
        "print(sorted({type(m).__name__ for model in saved['models'] for m in model.modules()\n"
        "              if type(m).__name__.startswith('Fused')}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "['FusedGlobalContextVitBlock', 'FusedSwinTransformerBlock']" in done.stdout


@pytest.mark.parametrize("name", MODELS)
def test_deepcopy(name):
    _, acc = _models(name)
    clone = copy.deepcopy(acc)
    assert [type(b) for b in _blocks(clone, name)] == [type(b) for b in _blocks(acc, name)]
    assert not set(map(id, clone.parameters())) & set(map(id, acc.parameters()))
    x = _image()
    with torch.no_grad():
        assert torch.equal(clone(x), acc(x))


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_forward(name):
    """model.to(torch.bfloat16): the accelerated model is at most twice as far from the fp32
    output as the plain bf16 model (conftest's accuracy rule)."""
    plain, acc = _models(name)
    x = _image()
    with torch.no_grad():
        exact = plain(x)
        plain_bf16 = plain.to(torch.bfloat16)(x.bfloat16())
        out = acc.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close_to_exact(out, plain_bf16, exact, torch.bfloat16, f"{name} logits")


# ---- torch.compile, torch.export, checkpointing ----------------------------------------------


def _train_step(model: torch.nn.Module, x: torch.Tensor, run=None) -> tuple[torch.Tensor, dict]:
    """Output and parameter gradients of one train-mode step of `run` (default: the model)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = (run if run is not None else model)(x)
    out.square().mean().backward()
    return out, _grads(model)


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph_aot_eager(name):
    _, acc = _models(name)
    x = _image()
    ref, ref_grads = _train_step(acc, x)
    torch._dynamo.reset()
    out, grads = _train_step(acc, x, torch.compile(acc, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out, ref)
    _assert_same_grads(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_compile_inductor_block():
    """Inductor on one accelerated Swin block (padded and shifted), forward and backward."""
    _, acc = _models("swin_tiny_patch4_window7_224")
    block = acc.layers[1].blocks[1]
    assert block.shift_size == (3, 3) and block.input_resolution[0] % block.window_size[0]
    x = _input(1, 8, 8, 192).requires_grad_()
    ref = block(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True, backend="inductor")(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_export(name):
    _, acc = _models(name)
    x = _image()
    exported = torch.export.export(acc, (x,))
    assert _calls_tokenmix(exported.graph)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), acc(x))


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing(name):
    _, acc = _models(name)
    x = _image()
    ref, ref_grads = _train_step(acc, x)
    acc.set_grad_checkpointing(True)
    out, grads = _train_step(acc, x)
    torch.testing.assert_close(out, ref)
    _assert_same_grads(grads, ref_grads, rtol=1e-5, atol=1e-7)


# ---- DDP ------------------------------------------------------------------------------------

DDP_STEPS = 3


def _small_swin() -> torch.nn.Module:
    """An accelerated Swin-T layout with narrow stages on 32 px images (window 4: the first stage
    is shifted), the same weights in every process."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                              window_size=4, embed_dim=24, num_classes=5, drop_path_rate=0.0)
    tokenmix.accelerate(model)
    assert all(r.replaced for r in model.tokenmix_report)
    return model


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(DDP_STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor,
                y: torch.Tensor) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        model = _small_swin()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per_rank = x.shape[0] // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        _train(ddp, x[part], y[part])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo unavailable")
def test_ddp_two_processes(tmp_path):
    """Two gloo processes, a few SGD steps: both ranks end with the same parameters, those of one
    process training on the combined batch."""
    x, y = _input(4, 3, 32, 32), torch.tensor([0, 3, 1, 4])
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), x, y),
                                nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = _small_swin()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    _train(single, x, y)
    expected = single.state_dict()
    assert rank0.keys() == rank1.keys() == expected.keys()
    for k in expected:
        assert torch.equal(rank0[k], rank1[k]), k
        torch.testing.assert_close(rank0[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(expected[k], before[k]) for k in expected)
