"""End-to-end benchmark of the reference backbones (``python -m tokenmix bench --models``): each
model of :mod:`tokenmix.models` fused vs ``fused=False`` (its official eager token mixers, same
weights) vs ``torch.compile`` of the ``fused=False`` model, in one process with the variants
interleaved round by round (:func:`tokenmix.bench.harness.time_interleaved`).

- forward: eval mode under ``no_grad``, what inference runs (DynamicViT prunes tokens here);
- forward+backward: train mode, the loss ``logits.sum()`` back to every parameter, what a
  training step runs (DynamicViT runs its Gumbel decisions and policy attention here).

Beside the times: images per second of each variant, and the share of the fused model's time
spent inside tokenmix ops (``torch.profiler``, one profiled call per pass; see
:func:`_tokenmix_share`): where the share is small, no kernel can make the model much faster.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from tokenmix.bench.harness import Progress, Row, _sync, metadata, steady_heap, time_interleaved

__all__ = ["run_models", "format_models_table"]


def _models(name: str, device: torch.device, dtype: torch.dtype) -> Dict[str, nn.Module]:
    import tokenmix.models as models
    torch.manual_seed(0)
    fused = models.create(name)
    unfused = models.create(name, fused=False)
    unfused.load_state_dict(fused.state_dict(), strict=True)
    return {"fused": fused.to(device, dtype), "eager": unfused.to(device, dtype)}


def _tokenmix_share(fn: Callable[[], None], device: torch.device) -> float:
    """Fraction of ``fn``'s time spent in ``tokenmix::`` ops, from one profiled call after the
    timed ones: the inclusive time of each outermost tokenmix op (the ATen calls a kernel makes
    inside it count as its own; an op nested in another tokenmix op counts once) over the sum of
    every op's self time. On CPU the time is CPU time; on CUDA, kernel time."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.events()

    def outermost(ev) -> bool:
        if not ev.name.startswith("tokenmix::"):
            return False
        parent = ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("tokenmix::"):
                return False
            parent = parent.cpu_parent
        return True

    if device.type == "cuda":
        total = sum(ev.self_device_time_total for ev in events)
        mixer = sum(ev.device_time_total for ev in events if outermost(ev))
    else:
        total = sum(ev.self_cpu_time_total for ev in events)
        mixer = sum(ev.cpu_time_total for ev in events if outermost(ev))
    return mixer / total if total else 0.0


def _model_rows(name: str, device: torch.device, dtype: torch.dtype, batch: int, size: int, reps: int,
                compile_ref: bool, amp: Optional[torch.dtype]) -> List[Row]:
    mods = _models(name, device, dtype)
    if compile_ref:
        torch._dynamo.reset()  # a fresh cache per model: no recompile limit shared across models
        mods["compiled"] = torch.compile(mods["eager"], dynamic=False)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def fwd(m: nn.Module) -> Callable[[], None]:
        def run():
            with torch.no_grad(), autocast():
                m(x)
        return run

    def fwd_bwd(m: nn.Module) -> Callable[[], None]:
        params = [p for p in m.parameters() if p.requires_grad]

        def run():
            with autocast():
                out = m(x)
            torch.autograd.backward(out.float().sum(), inputs=params)
            for p in params:
                p.grad = None
        return run

    for m in mods.values():
        m.eval()
    with torch.no_grad(), autocast():
        err = (mods["fused"](x).double() - mods["eager"](x).double()).abs().max().item()
    rows = []
    for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for m in mods.values():
            m.train(mode == "fwd+bwd")
        t = time_interleaved({k: make(m) for k, m in mods.items()}, device, reps, warmup=2)
        comp = t.get("compiled")
        row = Row(op=f"{name} (model)", case=f"{name} B={batch} {size}x{size}", mode=mode,
                  fused_ms=t["fused"] * 1e3, eager_ms=t["eager"] * 1e3,
                  compiled_ms=comp * 1e3 if comp else None, speedup_vs_eager=t["eager"] / t["fused"],
                  speedup_vs_compiled=comp / t["fused"] if comp else None, max_abs_err=err)
        row.extra = {f"images_per_s_{k}": batch / v for k, v in t.items()}
        row.extra["tokenmix_share"] = _tokenmix_share(make(mods["fused"]), device)
        rows.append(row)
    return rows


def run_models(names: Sequence[str], device: torch.device, dtype: torch.dtype, batch: int, reps: int = 10,
               size: int = 224, compile_ref: bool = True, progress: bool = True,
               amp: Optional[torch.dtype] = None) -> dict:
    """Benchmark the named models; the JSON-ready result (``kind: "models"``, metadata, rows)."""
    heap = steady_heap() if device.type == "cpu" else None
    rows: List[Row] = []
    bar = Progress(len(names), progress)
    for name in names:
        rows.extend(_model_rows(name, device, dtype, batch, size, reps, compile_ref, amp))
        bar.step(name)
    return {"kind": "models", "batch": batch, "image_size": size, **metadata(device, dtype, amp, reps, heap),
            "rows": [asdict(r) for r in rows]}


def format_models_table(result: dict) -> str:
    amp = f", autocast {result['autocast']}" if result.get("autocast") else ""
    head = (f"{'model':<24}{'pass':<9}{'fused img/s':>12}{'unfused':>9}{'compile':>9}{'x unfused':>10}"
            f"{'x compile':>10}{'tokenmix share':>16}{'max err':>10}")
    lines = [f"device: {result['device']} ({result['device_type']}, {result['dtype']}{amp}, batch "
             f"{result['batch']}, {result['image_size']}x{result['image_size']}, torch {result['torch']}, "
             f"commit {result['commit']})", head, "-" * len(head)]
    for r in result["rows"]:
        e = r["extra"]
        comp = f"{e['images_per_s_compiled']:.1f}" if "images_per_s_compiled" in e else "-"
        xcomp = f"{r['speedup_vs_compiled']:.2f}" if r["speedup_vs_compiled"] else "-"
        lines.append(f"{r['op'].replace(' (model)', ''):<24}{r['mode']:<9}{e['images_per_s_fused']:>12.1f}"
                     f"{e['images_per_s_eager']:>9.1f}{comp:>9}{r['speedup_vs_eager']:>10.2f}{xcomp:>10}"
                     f"{100 * e['tokenmix_share']:>15.0f}%{r['max_abs_err']:>10.1e}")
    lines.append("fwd: eval mode, no_grad; fwd+bwd: train mode, every parameter's gradient. unfused: "
                 "fused=False (the official eager token mixers); compile: torch.compile of the unfused "
                 "model; tokenmix share: the fused model's time inside tokenmix ops (profiler).")
    return "\n".join(lines)
