"""Command line: ``python -m tokenmix info | check | bench | demo | ops``."""
from __future__ import annotations

import argparse
import os
import sys

import torch

import tokenmix

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64}


def cmd_info(_args=None) -> int:
    i = tokenmix.info()
    build = "CPU + CUDA" if i["cuda_compiled"] else "CPU only"
    print(f"tokenmix {i['tokenmix']}  ({build} build)")
    print(f"torch    {i['torch']}  (CUDA {i['torch_cuda'] or 'none'})")
    print(f"cpu      kernels: {i['cpu_capability']}")
    if i["cuda_compiled"]:
        print(f"cuda     archs: {', '.join('sm_' + a for a in i['cuda_archs'])}; "
              f"device: {i['cuda_device'] or 'none visible'}")
        print(f"cutlass  {'yes' if i['cutlass'] else 'no (gnconv gated GEMMs use ATen GEMMs + elementwise)'}")
    else:
        print("cuda     not compiled (rebuild with a CUDA build of torch and nvcc, TOKENMIX_CUDA=ON)")
    w = max(map(len, i["ops"]), default=0) + 2
    print(f"\n{'op':<{w}}{'family':<18}{'cpu':<6}{'cuda':<6}{'backward':<9}")
    for op, d in i["ops"].items():
        yes = lambda b: "yes" if b else "-"  # noqa: E731
        print(f"{op:<{w}}{d['family']:<18}{yes(d['cpu']):<6}{yes(d['cuda']):<6}{yes(d['autograd']):<9}")
    return 0


def _device_usable(device: torch.device) -> bool:
    """Whether `device` can run the ops here; says why not on stderr."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return False
    if device.type == "cuda" and not tokenmix.info()["cuda_compiled"]:
        print("this tokenmix build has no CUDA kernels", file=sys.stderr)
        return False
    return True


def cmd_check(args) -> int:
    from tokenmix import check

    device = torch.device(args.device)
    if not _device_usable(device):
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        check.select(args.ops)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU kernels {tokenmix.info()['cpu_capability']}"
    print(f"tokenmix {tokenmix.__version__} check on {device.type} ({where}), torch {torch.__version__}")
    print(check.HEADER, flush=True)
    rows = check.run(args.ops, device.type, dtype, modules=not args.no_modules, out=sys.stdout,
                     failures_only=args.failures_only)
    print(check.summary(rows))
    return 0 if all(r.ok for r in rows) else 1


def cmd_ops(args) -> int:
    from tokenmix import registry

    try:
        specs = registry.select(args.ops)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.test_files:
        print(" ".join(registry.test_files(args.ops)))
        return 0
    if args.readme_table:
        print(registry.readme_op_table())
        return 0
    w = max((len(s.name) for s in specs), default=0) + 2
    print(f"{'op':<{w}}{'family':<18}{'autocast':<10}{'seed models':<26}test module")
    for spec in specs:
        print(f"{spec.name:<{w}}{spec.family:<18}{spec.autocast:<10}{', '.join(spec.seed_models):<26}{spec.test_file}")
    return 0


def cmd_bench(args) -> int:
    from tokenmix import bench

    device = torch.device(args.device)
    if not _device_usable(device):
        return 2
    dtype = DTYPES[args.dtype]
    amp = getattr(args, "amp", None)
    if amp is not None:
        # Autocast's own defaults: bf16 on CPU, fp16 on CUDA; the inputs stay fp32.
        amp = DTYPES[amp] if amp != "default" else (torch.bfloat16 if device.type == "cpu" else torch.float16)
        dtype = torch.float32
    if getattr(args, "models", False):
        return _bench_models(args, device, dtype, amp)
    cases = bench.select_cases(args.ops, device.type, quick=getattr(args, "quick", False))
    result = bench.run(cases, device, dtype, reps=args.reps, compile_ref=not args.no_compile,
                       progress=not args.quiet, amp=amp, threads=_thread_counts(args.threads))
    # A rerun of some ops: the README's tables keep the other cases' rows from earlier files.
    result["selection"] = sorted(args.ops) if args.ops else None
    print(bench.format_table(result))
    if args.out:
        bench.write_json(result, args.out)
        png = os.path.splitext(args.out)[0] + ".png"
        wrote = bench.write_chart(result, png)
        print(f"\nwrote {args.out}" + (f" and {png}" if wrote else " (no chart: matplotlib missing)"))
    if result["failed"]:
        print(f"\n{len(result['failed'])} case(s) failed: " + "; ".join(f"{f['op']} / {f['case']}" for f in result["failed"]))
        return 1
    return 0


def _thread_counts(spec: str) -> list[int]:
    """``--threads``: comma-separated counts, ``all`` being torch's default intra-op count."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        n = torch.get_num_threads() if part == "all" else int(part)
        if n < 1:
            raise SystemExit(f"--threads: counts must be >= 1, got {part!r}")
        out.append(n)
    return out


def _bench_models(args, device: torch.device, dtype: torch.dtype, amp) -> int:
    """``bench --models [names]``: the reference backbones end to end."""
    import tokenmix.models as models
    from tokenmix.bench import harness
    from tokenmix.bench.models import format_models_table, run_models

    names = args.ops or models.list_models()
    unknown = sorted(set(names) - set(models.list_models()))
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {models.list_models()}", file=sys.stderr)
        return 2
    batch = args.batch or (8 if device.type == "cpu" else 64)
    result = run_models(names, device, dtype, batch, reps=args.reps, compile_ref=not args.no_compile,
                        progress=not args.quiet, amp=amp)
    # A rerun of some models: the README's table keeps the other models' rows from earlier files.
    result["selection"] = sorted(args.ops) if args.ops else None
    print(format_models_table(result))
    if args.out:
        harness.write_json(result, args.out)
        print(f"\nwrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    cmd_info()
    device = "cuda" if torch.cuda.is_available() and tokenmix.info()["cuda_compiled"] else "cpu"
    print(f"\nquick benchmark on {device} (fused vs eager vs torch.compile, median of {args.reps} runs; "
          "whole-model cases: python -m tokenmix bench):")
    ns = argparse.Namespace(device=device, dtype="float32", ops=[], reps=args.reps, out=None,
                            no_compile=args.no_compile, quiet=False, quick=True)
    return cmd_bench(ns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenmix", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, torch, compiled backends and per-op kernels")
    c = sub.add_parser("check", help="every op (and module) vs its oracle, forward and gradients, in each dtype")
    c.add_argument("ops", nargs="*", help="ops, families or modules to check (default: all)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--dtype", choices=sorted(DTYPES),
                   help="only this dtype (default: every dtype each op supports on the device)")
    c.add_argument("--no-modules", action="store_true", help="ops only, not the tokenmix.nn modules")
    c.add_argument("--failures-only", action="store_true", help="print only the rows that fail")
    o = sub.add_parser("ops", help="the op registry: ops, families, test modules")
    o.add_argument("ops", nargs="*", help="ops or families (default: all)")
    o.add_argument("--test-files", action="store_true",
                   help="print the op test modules, space-separated (what the Makefile runs per CPU ISA)")
    o.add_argument("--readme-table", action="store_true", help="print the README's op table (markdown)")
    b = sub.add_parser("bench", help="fused vs eager vs torch.compile(eager) at backbone shapes")
    b.add_argument("ops", nargs="*", help="ops or families to run (default: all); with --models, model names")
    b.add_argument("--models", action="store_true",
                   help="the reference backbones end to end (tokenmix.models): fused vs fused=False vs "
                        "torch.compile(fused=False), images/s, and the time share of tokenmix ops")
    b.add_argument("--batch", type=int, help="with --models: the batch (default 8 on CPU, 64 on CUDA)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    b.add_argument("--amp", nargs="?", const="default", choices=["default", "float16", "fp16", "bfloat16", "bf16"],
                   help="time every variant under torch.autocast (default dtype: bf16 on CPU, fp16 on "
                        "CUDA) with fp32 inputs, as mixed-precision training runs them")
    b.add_argument("--reps", type=int, default=40, help="timed rounds per variant (--models: 10 is plenty)")
    b.add_argument("--out", help="write JSON here (and a PNG chart beside it)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    b.add_argument("--threads", default="all,1",
                   help="CPU: comma-separated intra-op thread counts to run every case at ('all' = torch's "
                        "default; default 'all,1')")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    d = sub.add_parser("demo", help="info, then a quick bench of every op (what `make demo` runs)")
    d.add_argument("--reps", type=int, default=15)
    d.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "ops": cmd_ops, "bench": cmd_bench,
            "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
