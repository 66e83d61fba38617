"""The shift-family modules against the official modules (tokenmix.reference.shift_official):
Hire-MLP's HireMLP, CycleMLP's CycleFC, AS-MLP's AxialShift, RaftMLP's serial token mixer, and the
hire_mlp_tiny backbone.

Each module test builds the official module, loads its state_dict (official keys) into the
tokenmix module with strict=True, and compares in fp64 the output, the input's gradient and the
gradient of every parameter (tokenmix.testing's accuracy rule at fp64: ~1e-10 relative), in
train and eval mode."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import tokenmix.reference.shift_official as official
from conftest import assert_channels_last_matches, check_against_oracle
from tokenmix.bench.shift_modules import randomise
from tokenmix.nn import AxialShift, CycleFC, HireMLP, RaftTokenMixer
from tokenmix.nn.shift import chunk_sizes

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise(mod: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and BatchNorm statistics (so eval mode is exercised too)."""
    return randomise(mod, _gen(seed))


def _pair(fused: nn.Module, ref: nn.Module, train: bool) -> tuple[nn.Module, nn.Module]:
    """The official module randomised, its state_dict loaded into the fused one (strict); both
    fp64 in the given mode."""
    _randomise(ref)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return fused.double().train(train), ref.double().train(train)


def _check(fused: nn.Module, ref: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """Output, input gradient and every parameter gradient of `fused` vs `ref` (fp64)."""
    names = [n for n, _ in fused.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in ref.named_parameters())

    def run(mod):
        return lambda x, *ps: functional_call(mod, dict(zip(names, ps)), (x,))

    params = [p.detach() for p in fused.parameters()]
    check_against_oracle(run(fused), run(ref), [x.to(F64)] + params, F64, seed=seed)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _same_layout_result(mod: nn.Module, x: torch.Tensor) -> None:
    """A channels_last input gives the NCHW input's result."""
    with torch.no_grad():
        a, b = mod(x), mod(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


# ---- HireMLP ----------------------------------------------------------------------------------

# Hire-MLP-Tiny's four stages (channels, map side, pixel), at batch 1 (2 for stage 4); stage 2's 28
# rows are not a multiple of its pixel 3, stage 3's 14 neither.
HIRE_STAGES = {"stage1": (64, 56, 4), "stage2": (128, 28, 3), "stage3": (320, 14, 3), "stage4": (512, 7, 2)}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("step", [0, 1, 2])
@pytest.mark.parametrize("stage", list(HIRE_STAGES))
def test_hire_mlp_matches_official(stage, step, train):
    dim, side, pixel = HIRE_STAGES[stage]
    fused, ref = _pair(HireMLP(dim, pixel=pixel, step=step), official.HireMLP(dim, pixel=pixel, step=step), train)
    assert fused.fused and fused.fusable
    _check(fused, ref, _x(2 if stage == "stage4" else 1, dim, side, side))


def test_hire_mlp_rectangular_map_and_large_step():
    """H != W, neither a multiple of the pixel, a step larger than the map (the roll wraps)."""
    fused, ref = _pair(HireMLP(16, pixel=3, step=7), official.HireMLP(16, pixel=3, step=7), True)
    _check(fused, ref, _x(2, 16, 5, 8))


@pytest.mark.parametrize("modes", [('0', 'c'), ('c', '0'), ('c', 'replicate'), ('0', '0')])
def test_hire_mlp_other_pad_modes_run_the_official_computation(modes):
    fused, ref = _pair(HireMLP(16, pixel=3, step=1, step_pad_mode=modes[0], pixel_pad_mode=modes[1]),
                       official.HireMLP(16, pixel=3, step=1, step_pad_mode=modes[0], pixel_pad_mode=modes[1]), True)
    assert not fused.fusable
    _check(fused, ref, _x(2, 16, 7, 8))


def test_hire_mlp_unfused_flag_and_bad_modes():
    fused, ref = _pair(HireMLP(32, pixel=3, step=2), official.HireMLP(32, pixel=3, step=2), True)
    fused.fused = False
    _check(fused, ref, _x(2, 32, 10, 11))
    with pytest.raises(ValueError, match="step_pad_mode"):
        HireMLP(8, step_pad_mode='x')
    with pytest.raises(ValueError, match="pixel_pad_mode"):
        HireMLP(8, pixel_pad_mode='reflect')


def test_hire_mlp_batchnorm_statistics_update_like_official():
    """Training steps move the running statistics exactly as the official module's."""
    fused, ref = _pair(HireMLP(32, pixel=3, step=1), official.HireMLP(32, pixel=3, step=1), True)
    for seed in (1, 2):
        x = _x(2, 32, 10, 9, seed=seed)
        fused(x), ref(x)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-12, atol=1e-12, msg=k)


def test_hire_mlp_channels_last():
    fused, _ = _pair(HireMLP(32, pixel=3, step=1), official.HireMLP(32, pixel=3, step=1), False)
    _same_layout_result(fused, _x(2, 32, 10, 9))


def _check_compiles(mod: nn.Module, x: torch.Tensor) -> None:
    """torch.compile(fullgraph=True, aot_eager) traces the module in train mode with no graph
    break and matches eager: output, input and parameter gradients, BatchNorm statistics. (Not
    conftest's check_compiles: run back to back on one module, the eager and compiled forwards
    would both update the same running statistics before either backward.)"""
    torch._dynamo.reset()
    ref = copy.deepcopy(mod)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = ref(xa), compiled(xb)
    torch.testing.assert_close(out_c, out_e)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    for (n, p), q in zip(mod.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for (n, b), c in zip(mod.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=n)


@pytest.mark.parametrize("side", [(10, 9), (32, 32)], ids=["broadcast-mix", "batched-mix"])
def test_hire_mlp_compiles_without_graph_break(side):
    """Small planes mix the branches with broadcast products, planes of 1024 pixels with batched
    ones (in place into one buffer): both trace without a break."""
    fused, _ = _pair(HireMLP(32, pixel=3, step=1), official.HireMLP(32, pixel=3, step=1), True)
    _check_compiles(fused.float(), torch.randn(2, 32, *side, generator=_gen()))


def test_modules_script():
    """TorchScript compiles every module and gives its eager result."""
    mods = [(HireMLP(16, pixel=3), 16), (CycleFC(8, 8, (1, 3)), 8), (AxialShift(10, 3), 10),
            (RaftTokenMixer(8, 5, 6, 2), 8)]
    for mod, C in mods:
        x = torch.randn(2, C, 5, 6, generator=_gen())
        torch.testing.assert_close(torch.jit.script(mod)(x), mod(x))


# ---- CycleFC ----------------------------------------------------------------------------------

# CycleMLP-B1 stage 1: 64 channels on 56 x 56 tokens; its two orientations and a longer kernel.
@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (1, 7)], ids=["1x3", "3x1", "1x7"])
def test_cycle_fc_matches_official(kernel):
    fused, ref = _pair(CycleFC(64, 64, kernel), official.CycleFC(64, 64, kernel), True)
    assert torch.equal(fused.offset, ref.offset.to(F64))
    _check(fused, ref, _x(1, 64, 56, 56))


def test_cycle_fc_equals_deform_conv2d_with_cyclemlp_offsets():
    """The same result as torchvision.ops.deform_conv2d and tokenmix.ops.deform_conv2d given
    CycleMLP's offsets."""
    import torchvision

    import tokenmix.ops as tm
    fused, ref = _pair(CycleFC(16, 24, (1, 3)), official.CycleFC(16, 24, (1, 3)), True)
    x = _x(2, 16, 9, 11)
    off = ref.offset.expand(2, -1, 9, 11)
    out = fused(x)
    for deform in (torchvision.ops.deform_conv2d, tm.deform_conv2d):
        torch.testing.assert_close(out, deform(x, off, fused.weight, fused.bias), rtol=1e-12, atol=1e-12)


def test_cycle_fc_fallbacks_and_checks():
    """groups > 1 falls back to tokenmix.ops.deform_conv2d; no bias; the official checks."""
    fused, ref = _pair(CycleFC(16, 24, (3, 1), groups=4), official.CycleFC(16, 24, (3, 1), groups=4), True)
    _check(fused, ref, _x(2, 16, 7, 5))
    fused, ref = _pair(CycleFC(8, 8, (1, 5), bias=False), official.CycleFC(8, 8, (1, 5), bias=False), True)
    assert "bias" not in fused.state_dict()
    _check(fused, ref, _x(2, 8, 4, 6))
    for kw, msg in [({"stride": 2}, "stride"), ({"padding": 1}, "padding"), ({"groups": 3}, "divisible")]:
        with pytest.raises(ValueError, match=msg):
            CycleFC(16, 24, (1, 3), **kw)
    with pytest.raises(ValueError, match="kernel_size"):
        CycleFC(8, 8, (3, 3))


def test_cycle_fc_channels_last():
    fused, _ = _pair(CycleFC(16, 24, (1, 3)), official.CycleFC(16, 24, (1, 3)), True)
    _same_layout_result(fused, _x(2, 16, 9, 11))


# ---- AxialShift -------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,shift_size", [(22, 5), (10, 3), (6, 5), (96, 5)])
def test_axial_shift_matches_official(dim, shift_size):
    """C not a multiple of shift_size (a smaller last chunk), and torch.chunk giving fewer chunks
    than shift_size (6 channels in 5 chunks: 2, 2, 2)."""
    assert chunk_sizes(dim, shift_size) == [t.shape[1] for t in torch.chunk(torch.empty(1, dim), shift_size, 1)]
    fused, ref = _pair(AxialShift(dim, shift_size), official.AxialShift(dim, shift_size), True)
    side = 28 if dim == 96 else 7
    _check(fused, ref, _x(2, dim, side, side + 1))


def test_axial_shift_sign_is_the_official_roll():
    """Chunk i moves by i - shift_size // 2: the first chunk reads from below / the right."""
    mod = AxialShift(3, 3)
    assert mod.shifts_lr == [(0, -1), (0, 0), (0, 1)] and mod.shifts_td == [(-1, 0), (0, 0), (1, 0)]
    x = torch.arange(3 * 4 * 5, dtype=F64).reshape(1, 3, 4, 5)
    torch.testing.assert_close(official.torch_shift(x, 3, 3)[0, 0, :, :-1], x[0, 0, :, 1:])


def test_axial_shift_no_bias_and_channels_last():
    fused, ref = _pair(AxialShift(12, 5, as_bias=False), official.AxialShift(12, 5, as_bias=False), False)
    _check(fused, ref, _x(2, 12, 6, 6))
    _same_layout_result(fused, _x(2, 12, 6, 6))


# ---- RaftMLP ----------------------------------------------------------------------------------

class _OfficialOnMap(nn.Module):
    """The official token-layout serial mixer between the map's rearrangements; the Sequential
    is registered as ``mixer``, so its keys are prefixed: the state_dict is reloaded below."""

    def __init__(self, channels, h, w, r):
        super().__init__()
        self.h, self.w, self.r = h, w, r
        self.mixer = official.raft_serial_token_mixer(channels, h, w, r)

    def forward(self, x):
        return official.raft_output_to_map(self.mixer(official.map_to_tokens(x)), self.h, self.w, self.r)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels,h,w,r", [(16, 14, 14, 4), (12, 5, 6, 3), (8, 7, 4, 2)])
def test_raft_token_mixer_matches_official(channels, h, w, r, train):
    ref_seq = _randomise(official.raft_serial_token_mixer(channels, h, w, r))
    fused = RaftTokenMixer(channels, h, w, r)
    assert list(fused.state_dict()) == list(ref_seq.state_dict())
    fused.load_state_dict(ref_seq.state_dict(), strict=True)
    ref = _OfficialOnMap(channels, h, w, r)
    ref.mixer.load_state_dict(ref_seq.state_dict(), strict=True)
    fused, ref = fused.double().train(train), ref.double().train(train)
    # Parameter names differ by the "mixer." prefix: compare through the official names.
    names = [n for n, _ in fused.named_parameters()]

    def run_fused(x, *ps):
        return functional_call(fused, dict(zip(names, ps)), (x,))

    def run_ref(x, *ps):
        return functional_call(ref, {f"mixer.{n}": p for n, p in zip(names, ps)}, (x,))

    params = [p.detach() for p in fused.parameters()]
    check_against_oracle(run_fused, run_ref, [_x(2, channels, h, w)] + params, F64)
    _same_layout_result(fused, _x(2, channels, h, w))


@pytest.mark.parametrize("name", ["CycleFC", "AxialShift", "RaftTokenMixer"])
def test_modules_compile_without_graph_break(name):
    mod = {"CycleFC": lambda: CycleFC(8, 8, (1, 3)), "AxialShift": lambda: AxialShift(10, 3),
           "RaftTokenMixer": lambda: RaftTokenMixer(8, 5, 6, 2)}[name]()
    _check_compiles(mod, torch.randn(2, 8 if name != "AxialShift" else 10, 5, 6, generator=_gen()))


# ---- hire_mlp_tiny ----------------------------------------------------------------------------

def test_hire_mlp_tiny_architecture():
    import tokenmix.models as models
    assert "hire_mlp_tiny" in models.list_models()
    model, ref = models.create("hire_mlp_tiny"), official.hire_mlp_tiny()
    n = sum(p.numel() for p in model.parameters())
    print(f"hire_mlp_tiny: {n / 1e6:.2f} M parameters")
    assert round(n / 1e6, 1) == 18.0 and n == sum(p.numel() for p in ref.parameters())
    assert list(model.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    model.load_state_dict(ref.state_dict(), strict=True)
    steps = [b.attn.step for stage in model.network[::2] for b in stage]
    assert steps == [0, 2, 0, 2, 0, 1, 2, 0, 0, 1]
    with pytest.raises(KeyError, match="hire_mlp_tiny"):
        models.create("no_such_model")


def test_hire_mlp_tiny_fused_equals_unfused_and_official():
    """Logits and every parameter gradient: fused, unfused (the library's eager path) and the
    official network, fp64, train mode, 64 x 64 images (stage 3 is 4 x 4 with pixel 3)."""
    import tokenmix.models as models
    ref = _randomise(official.hire_mlp_tiny()).double().train()
    nets = {"fused": models.create("hire_mlp_tiny"), "unfused": models.create("hire_mlp_tiny", fused=False)}
    x = _x(2, 3, 64, 64)
    g = torch.randn(2, 1000, generator=_gen(5), dtype=F64)
    out_ref = ref(x)
    out_ref.backward(g)
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    for tag, net in nets.items():
        net.load_state_dict(ref.state_dict(), strict=True)
        net.double().train()
        out = net(x)
        out.backward(g)
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-11, msg=tag)
        # Every parameter's gradient against its own scale, floored at 1e-4 of the largest one:
        # a bias right before a train-mode BatchNorm has an exactly-zero gradient up to rounding.
        floor = 1e-4 * max(g.abs().max().item() for g in grads_ref.values())
        errs = {n: ((p.grad - grads_ref[n]).abs().max() / max(floor, grads_ref[n].abs().max().item())).item()
                for n, p in net.named_parameters()}
        worst = max(errs, key=errs.get)
        print(f"{tag}: worst gradient {worst}, relative error {errs[worst]:.1e}")
        assert errs[worst] < 1e-9, f"{tag}: grad {worst} relative error {errs[worst]:.3e}"
    assert all(b.attn.fused for stage in nets["fused"].network[::2] for b in stage)
    assert not any(b.attn.fused for stage in nets["unfused"].network[::2] for b in stage)


def test_hire_mlp_tiny_timm_and_channels_last():
    timm = pytest.importorskip("timm")
    import tokenmix.models  # noqa: F401
    model = timm.create_model("hire_mlp_tiny", num_classes=10, drop_path_rate=0.1).eval()
    assert model.num_classes == 10 and model.pretrained_cfg["input_size"] == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        timm.create_model("hire_mlp_tiny", pretrained=True)
    assert_channels_last_matches(model, torch.randn(2, 3, 64, 64, generator=_gen()), 10)
