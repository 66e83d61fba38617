"""Per-kernel times of each benchmark case's fused forward+backward (torch.profiler), so a short
GPU lease shows where the time goes, not only the end-to-end ratio.

    python tools/cuda_profile.py [OPS...] [--dtype float16] [--device cuda] [--rows 10]

Prints, per case, the kernels (on CPU: the ops) sorted by their own time over a few profiled
iterations, at the benchmark's batch size for that device.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--models", action="store_true", help="include the whole-model cases")
    ap.add_argument("--eager", action="store_true", help="also profile each case's eager baseline")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
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
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
