"""Per-kernel times of each benchmark case's fused forward+backward (torch.profiler), so a short
GPU lease shows where the time goes, not only the end-to-end ratio.

    python tools/cuda_profile.py [OPS...] [--dtype float16] [--device cuda] [--rows 10]
    python tools/cuda_profile.py --swin-train [--batch 64]

Prints, per case, the kernels (on CPU: the ops) sorted by their own time over a few profiled
iterations, at the benchmark's batch size for that device. ``--swin-train`` profiles a training
step (forward, loss, backward) of timm's swin_tiny under autocast instead, accelerated and as timm
builds it, with the share of the time spent in tokenmix's kernels.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmix.bench import select_cases

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _table(prof, sort_by: str, rows: int) -> str:
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)


def swin_train(batch: int, dtype: torch.dtype, device: torch.device, rows: int, iters: int) -> None:
    """A training step of swin_tiny_patch4_window7_224 under autocast, accelerated and original."""
    import copy

    import timm

    import tokenmix

    torch.manual_seed(0)
    base = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).to(device).train()
    models = {"accelerated": tokenmix.accelerate(copy.deepcopy(base)), "timm": base}
    x = torch.randn(batch, 3, 224, 224, device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, model in models.items():
        def step(model=model):
            with torch.autocast(device.type, dtype=dtype):
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()

        for _ in range(3):
            step()
        sync()
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(iters):
                step()
            sync()
        events = prof.key_averages()
        own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        total = sum(own(e) for e in events)
        ours = sum(own(e) for e in events if "tokenmix" in e.key)
        print(f"\n=== swin_tiny training step, {name} (B={batch}, autocast {dtype}, {iters} iterations): "
              f"{total / 1e3 / iters:.2f} ms of kernels per step, {100 * ours / max(total, 1):.0f}% in tokenmix kernels")
        print(_table(prof, "self_device_time_total" if cuda else "self_cpu_time_total", rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--models", action="store_true", help="include the whole-model cases")
    ap.add_argument("--eager", action="store_true", help="also profile each case's eager baseline")
    ap.add_argument("--swin-train", action="store_true",
                    help="profile a swin_tiny training step (accelerated and timm's) instead of the cases")
    ap.add_argument("--batch", type=int, default=64, help="with --swin-train: the batch")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.swin_train:
        swin_train(args.batch, dtype, device, args.rows, args.iters)
        return 0
    for case in select_cases(args.ops, args.device, quick=not args.models):
        inputs, needs_grad = case.make(device, dtype)
        ins = [t.detach().requires_grad_() if any(t is n for n in needs_grad) else t for t in inputs]
        leaves = [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]
        variants = {"fused": case.fused, "eager": case.eager} if args.eager else {"fused": case.fused}
        for variant, fn in variants.items():
            def step(fn=fn):
                out = _first(fn(*ins))
                if case.backward and leaves:
                    torch.autograd.backward(out, torch.ones_like(out), inputs=leaves)

            for _ in range(3):
                step()
            sync()
            with profile(activities=activities) as prof:
                for _ in range(args.iters):
                    step()
                sync()
            print(f"\n=== {case.op}: {case.name}, {variant} ({args.dtype}, "
                  f"fwd{'+bwd' if case.backward else ''}, {args.iters} iterations)")
            print(_table(prof, sort_by, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
