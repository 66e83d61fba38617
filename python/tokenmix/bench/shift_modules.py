"""Benchmark cases of the shift-family modules at the shapes of the backbones that use them, each
the tokenmix module (``tokenmix.nn``) vs the official module's eager computation
(``tokenmix.reference.shift_official``) with the same parameters, and torch.compile of the
official one:

- CycleMLP-B1 stage 1: ``CycleFC`` (64 ch, 56 x 56, kernel 1 x 3) vs the official
  ``torchvision.ops.deform_conv2d`` with fixed offsets;
- Hire-MLP-Tiny stage 1 (64 ch, 56 x 56, pixel 4, step 2) and stage 3 (320 ch, 14 x 14, pixel 3,
  step 1): ``HireMLP`` vs the official rolls, pads, reshapes and convolutions (train mode);
- AS-MLP-T stage 1: ``AxialShift`` (96 ch, 56 x 56, shift 5) vs the official pad + chunk + roll.

The whole ``hire_mlp_tiny`` is in the backbone benchmark (``python -m tokenmix bench --models``).

Parameters are inputs of the timed functions (``torch.func.functional_call``), so fwd+bwd
includes every weight gradient. Also the ``<module>_module_sample()`` builders for
``python -m tokenmix check``; their oracles are in ``tokenmix.reference.shift_official``.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

import tokenmix.reference.shift_official as official
from tokenmix.bench.harness import Case
from tokenmix.nn import AxialShift, CycleFC, HireMLP, RaftTokenMixer
from tokenmix.samples import Draw, ModuleSample, seeded

__all__ = ["module_cases", "randomise", "hire_mlp_module_sample", "cycle_fc_module_sample",
           "axial_shift_module_sample", "raft_token_mixer_module_sample"]


def randomise(mod: nn.Module, gen: torch.Generator) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 1/4), BatchNorm statistics away from (0, 1), in
    place; returns ``mod``."""
    with torch.no_grad():
        for p in mod.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
        for m in mod.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return mod


def _caller(mods: Dict[str, nn.Module], tag: str) -> Callable:
    """``fn(x, *params)``: module ``tag`` run with the given parameters (named as the fused
    module's, which both modules share) and its buffers, floating ones cast to x's dtype when they
    differ (the fp64 reference run)."""
    def run(x: Tensor, *params: Tensor) -> Tensor:
        mod = mods[tag]
        state = dict(zip(mods["names"], params))
        for k, b in mod.named_buffers():
            if b.is_floating_point() and b.dtype != x.dtype:
                state[k] = b.to(x.dtype)
        return functional_call(mod, state, (x,))
    return run


def _module_case(op: str, name: str, fused: Callable[[], nn.Module], eager: Callable[[], nn.Module],
                 shape: Sequence[int], train: bool = True, input_grad: bool = True) -> Case:
    """A Case timing ``fused()`` vs ``eager()`` (built, then given the fused module's state_dict)
    on a random ``shape`` input; the compiled variant is ``eager`` under torch.compile."""
    mods: Dict = {}

    def make(device, dtype):
        gen = torch.Generator().manual_seed(0)
        f = randomise(fused(), gen)
        e = eager()
        e.load_state_dict(f.state_dict(), strict=True)
        mods["fused"], mods["eager"] = f.to(device, dtype).train(train), e.to(device, dtype).train(train)
        mods["names"] = [n for n, _ in f.named_parameters()]
        x = torch.randn(*shape, generator=gen).to(device, dtype)
        params = [p.detach() for p in mods["fused"].parameters()]
        return [x] + params, ([x] if input_grad else []) + params

    eager_fn = _caller(mods, "eager")
    return Case(op, name, make, _caller(mods, "fused"), eager_fn, compile_target=eager_fn)


def module_cases(batch: int) -> list[Case]:
    out = [_module_case("CycleFC", f"CycleMLP-B1 stage 1 B={batch} 64ch 56x56 1x3 vs deform_conv2d",
                        lambda: CycleFC(64, 64, (1, 3)), lambda: official.CycleFC(64, 64, (1, 3)),
                        (batch, 64, 56, 56))]
    for stage, (dim, hw, pixel, step) in {"stage 1": (64, 56, 4, 2), "stage 3": (320, 14, 3, 1)}.items():
        out.append(_module_case(
            "HireMLP", f"Hire-MLP-T {stage} B={batch} {dim}ch {hw}x{hw} pixel{pixel} step{step}",
            lambda dim=dim, pixel=pixel, step=step: HireMLP(dim, pixel=pixel, step=step),
            lambda dim=dim, pixel=pixel, step=step: official.HireMLP(dim, pixel=pixel, step=step),
            (batch, dim, hw, hw)))
    out.append(_module_case("AxialShift", f"AS-MLP-T stage 1 B={batch} 96ch 56x56 shift5",
                            lambda: AxialShift(96, 5), lambda: official.AxialShift(96, 5), (batch, 96, 56, 56)))
    return out


# ---- module samples for `python -m tokenmix check` -------------------------------------------

def hire_mlp_module_sample() -> ModuleSample:
    """HireMLP on 16 channels, pixel 3, step 1, a 7 x 8 map (neither side a multiple of 3), eval
    mode with non-trivial BatchNorm statistics (in train mode the batch statistics would make the
    accuracy of some gradients hinge on cancellations)."""
    def build() -> nn.Module:
        return randomise(HireMLP(16, pixel=3, step=1), torch.Generator().manual_seed(0)).eval()

    return ModuleSample("HireMLP", seeded(build), (Draw("cpu", torch.float32).randn(2, 16, 7, 8),), ("x",))


def cycle_fc_module_sample() -> ModuleSample:
    """CycleFC 8 -> 12 channels, kernel 1 x 3, on a 5 x 7 map."""
    return ModuleSample("CycleFC", seeded(lambda: CycleFC(8, 12, (1, 3))),
                        (Draw("cpu", torch.float32).randn(2, 8, 5, 7),), ("x",))


def axial_shift_module_sample() -> ModuleSample:
    """AxialShift on 10 channels (torch.chunk: 4, 4, 2), shift size 3, on a 6 x 7 map."""
    return ModuleSample("AxialShift", seeded(lambda: AxialShift(10, 3)),
                        (Draw("cpu", torch.float32).randn(2, 10, 6, 7),), ("x",))


def raft_token_mixer_module_sample() -> ModuleSample:
    """RaftMLP's serial token mixer: 8 channels in rafts of 2, on a 5 x 6 map."""
    return ModuleSample("RaftTokenMixer", seeded(lambda: RaftTokenMixer(8, 5, 6, 2)),
                        (Draw("cpu", torch.float32).randn(2, 8, 5, 6),), ("x",))
