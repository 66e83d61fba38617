"""Benchmark harness: fused op vs eager reference vs torch.compile(reference), in one process.

Every case is timed forward (under no_grad) and forward+backward. The variants of a case run
interleaved, round after round, and each reports its median, so slow drifts of the machine hit all
variants alike; ratios measured in one run are what we compare across machines. Memory-bound
cases also report achieved GB/s against a plain tensor copy of the same bytes timed in that run.

On CPU the process's heap keeps the memory it frees (see `steady_heap`): with glibc's defaults a
multi-megabyte tensor is mapped fresh, or its pages handed back, depending on what was allocated
before, so one variant pays page faults in one run and not in the next.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

import tokenmix


@dataclass
class Case:
    """One benchmarked shape of one op.

    make(device, dtype) returns (inputs, tensors_needing_grad); fused/eager take *inputs and return
    a tensor (or a tuple whose first element is differentiated). bytes_fwd / bytes_bwd: the
    minimum memory traffic of each pass, for the bandwidth figure (0 = not memory-bound).
    """

    op: str
    name: str
    make: Callable[[torch.device, torch.dtype], tuple[list, list]]
    fused: Callable
    eager: Callable
    bytes_fwd: Callable[[torch.dtype], int] = lambda dt: 0
    bytes_bwd: Callable[[torch.dtype], int] = lambda dt: 0
    backward: bool = True
    # The exact result to measure the error against; default: `eager` on fp64 copies of the inputs.
    exact: Callable | None = None
    # Whole-model cases: slow to compile, left out of the quick demo.
    heavy: bool = False
    # What torch.compile is applied to (default: `eager`), e.g. the tokenmix oracle when `eager`
    # is another library's kernel.
    compile_target: Callable | None = None
    # A lower bound timed beside the others (e.g. the plain convolution a deformable one
    # generalises); reported as fused time / floor time.
    floor: Callable | None = None
    # Whether the floor also has a backward worth timing (False: forward only).
    floor_backward: bool = True
    # The arithmetic each pass must do (multiply and add counted apart), for compute-bound ops:
    # the achieved rate is reported against a GEMM of the same dtype timed in the same run.
    flops_fwd: int = 0
    flops_bwd: int = 0


@dataclass
class Row:
    op: str
    case: str
    mode: str  # "fwd" or "fwd+bwd"
    fused_ms: float
    eager_ms: float
    compiled_ms: float | None
    speedup_vs_eager: float
    speedup_vs_compiled: float | None
    max_abs_err: float
    gbps: float | None = None
    copy_gbps: float | None = None
    pct_of_copy: float | None = None
    # CPU: the intra-op thread count the row ran at.
    threads: int | None = None
    # Compute-bound cases: the fused op's GFLOP/s, and that as a share of the same-run GEMM rate.
    gflops: float | None = None
    pct_of_gemm: float | None = None
    extra: dict = field(default_factory=dict)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(fn: Callable, device: torch.device) -> float:
    """Seconds for one call (CUDA: events on the current stream)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable], device: torch.device, reps: int,
                     warmup: int = 3, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn; one call of each per round, rounds interleaved.
    `inner` calls are timed together (per-call time reported) when one call is too short to time.
    The order is shuffled every round (with a fixed seed), so that no fn always follows the same
    one: in a fixed order the fn after the yardstick (which sweeps the caches) would always start
    cold, and the one after a variant that read the same inputs would always start warm."""
    def many(f):
        def run():
            for _ in range(inner):
                f()
        return run

    loops = {k: many(f) for k, f in fns.items()}
    for _ in range(warmup):
        for f in loops.values():
            f()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys, order = list(loops), random.Random(0)
    for _ in range(reps):
        order.shuffle(keys)
        for k in keys:
            samples[k].append(_timer(loops[k], device) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def gemm_of(device: torch.device, dtype: torch.dtype) -> tuple[Callable, int]:
    """A square matrix product in `dtype` and its FLOPs: the compute yardstick of a compute-bound
    case, timed in the same rounds as the case (1024^3 on a CPU, 4096^3 on a GPU)."""
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2 * n ** 3


def copy_of(nbytes: int, device: torch.device) -> Callable:
    """A tensor copy moving nbytes (half read, half written): the bandwidth yardstick of a
    memory-bound op with that much minimum traffic, timed beside it."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(1, total), 0, enabled and total > 0
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s {label[:48]:<48}")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def saved_bytes(fn: Callable) -> int:
    """Bytes autograd keeps for backward while fn() builds its graph (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _max_err(fused_out, exact_out) -> float:
    f, e = _first(fused_out), _first(exact_out)
    return (f.double() - e.double().to(f.device)).abs().max().item() if f.numel() else 0.0


def under_autocast(fn: Callable, device: torch.device, amp: torch.dtype) -> Callable:
    """fn's forward inside ``torch.autocast(device.type, amp)``; backward runs outside it, as in
    a training step."""
    def run(*args):
        with torch.autocast(device.type, dtype=amp):
            return fn(*args)
    return run


def run_case(case: Case, device: torch.device, dtype: torch.dtype, reps: int,
             compile_ref: bool, amp: torch.dtype | None = None) -> list[Row]:
    """Rows of one case (fwd, and fwd+bwd where it has a backward). A memory-bound case times a
    copy of its bytes in the same rounds, a compute-bound one a GEMM of its dtype."""
    gemm = gemm_of(device, amp or dtype) if case.flops_fwd else None
    inputs, needs_grad = case.make(device, dtype)
    variants = {"fused": case.fused, "eager": case.eager}
    if compile_ref:
        variants["compiled"] = case.compile_target or case.eager
    if case.floor is not None:
        variants["floor"] = case.floor
    if amp is not None:
        variants = {k: under_autocast(f, device, amp) for k, f in variants.items()}
    if compile_ref:
        # A fresh cache per case: cases that share a function's code (closures over different
        # modules) would otherwise count as recompiles of one function and, past dynamo's limit,
        # silently run eager.
        torch._dynamo.reset()
        variants["compiled"] = torch.compile(variants["compiled"], dynamic=False)
    with torch.no_grad():
        if case.exact is not None:
            exact = case.exact(*inputs)
        else:
            exact = case.eager(*[t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                 else t for t in inputs])
        err = _max_err(variants["fused"](*inputs), exact)

    rows = []
    inner = 1 if device.type == "cuda" else 3

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run

    def timed(make_run, nbytes, skip=()):
        fns = {k: make_run(f) for k, f in variants.items() if k not in skip}
        if nbytes:
            fns["copy"] = copy_of(nbytes, device)
        if gemm is not None:
            fns["gemm"] = gemm[0]
        return time_interleaved(fns, device, reps, inner=inner)

    rows.append(_row(case, "fwd", timed(fwd, case.bytes_fwd(dtype)), err, case.bytes_fwd(dtype),
                     case.flops_fwd, gemm and gemm[1]))
    if case.backward:
        grad_inputs = [t.detach().requires_grad_() if any(t is n for n in needs_grad) else t
                       for t in inputs]
        leaves = [t for t in grad_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        out = _first(variants["eager"](*grad_inputs))
        grad_out = torch.randn_like(out)

        def fwd_bwd(fn):
            def run():
                o = _first(fn(*grad_inputs))
                torch.autograd.backward(o, grad_out.to(o.dtype), inputs=leaves)
            return run

        nbytes = case.bytes_fwd(dtype) + case.bytes_bwd(dtype)
        skip = () if case.floor_backward else ("floor",)
        row = _row(case, "fwd+bwd", timed(fwd_bwd, nbytes, skip), err, nbytes,
                   case.flops_fwd + case.flops_bwd if case.flops_fwd else 0, gemm and gemm[1])
        # What each variant keeps alive for backward (inputs that are leaves included).
        for k in ("fused", "eager"):
            fn = variants[k]
            row.extra[f"saved_mb_{k}"] = saved_bytes(lambda: fn(*grad_inputs)) / 2**20
        rows.append(row)
    return rows


def _row(case: Case, mode: str, t: dict[str, float], err: float, nbytes: int, flops: int = 0,
         gemm_flops: int | None = None) -> Row:
    compiled = t.get("compiled")
    row = Row(op=case.op, case=case.name, mode=mode, fused_ms=t["fused"] * 1e3,
              eager_ms=t["eager"] * 1e3, compiled_ms=compiled * 1e3 if compiled else None,
              speedup_vs_eager=t["eager"] / t["fused"],
              speedup_vs_compiled=compiled / t["fused"] if compiled else None, max_abs_err=err)
    if "floor" in t:
        row.extra["floor_ms"] = t["floor"] * 1e3
        row.extra["fused_over_floor"] = t["fused"] / t["floor"]
    if nbytes:
        row.gbps = nbytes / t["fused"] / 1e9
        row.copy_gbps = nbytes / t["copy"] / 1e9
        row.pct_of_copy = 100.0 * t["copy"] / t["fused"]
    if flops:
        row.gflops = flops / t["fused"] / 1e9
        if gemm_flops:
            row.extra["gemm_gflops"] = gemm_flops / t["gemm"] / 1e9
            row.pct_of_gemm = 100.0 * row.gflops / row.extra["gemm_gflops"]
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def steady_heap() -> bool:
    """Make glibc serve large allocations from the heap and keep freed memory there, as the
    caching allocators PyTorch's CPU tuning guides recommend (jemalloc, tcmalloc) do, so that no
    variant's time depends on whether its tensors happen to get fresh pages. Every variant gets
    the same heap. Returns whether the setting took (False: not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; freed memory is never trimmed.
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def run(cases: Sequence[Case], device: torch.device, dtype: torch.dtype, reps: int = 30,
        compile_ref: bool = True, progress: bool = True, amp: torch.dtype | None = None,
        threads: Sequence[int] | None = None) -> dict:
    """Run every case; return the JSON-ready result (metadata + rows). With `amp`, every variant
    (fused, eager, compiled, floor) runs its forward under ``torch.autocast`` in that dtype, the
    inputs staying in `dtype`. On a CPU every case runs at each intra-op thread count of `threads`
    (default: the current one), each row tagged with it, the GEMM yardstick timed at each. A case
    that raises is reported on stderr and listed under ``failed`` instead of ending the run: a
    short GPU lease keeps every other case's figures."""
    heap = steady_heap() if device.type == "cpu" else None
    counts = list(dict.fromkeys(threads or [torch.get_num_threads()])) if device.type == "cpu" else [None]
    rows: list[Row] = []
    failed: list[dict] = []
    bar = Progress(len(cases) * len(counts), progress)
    restore = torch.get_num_threads()
    try:
        for n in counts:
            if n is not None:
                torch.set_num_threads(n)
            for case in cases:
                try:
                    got = run_case(case, device, dtype, reps, compile_ref, amp)
                except Exception as exc:
                    failed.append({"op": case.op, "case": case.name, "threads": n,
                                   "error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(f"bench: {case.op} / {case.name} failed: {failed[-1]['error']}", file=sys.stderr)
                    got = []
                for r in got:
                    r.threads = n
                rows.extend(got)
                bar.step(f"{case.op} {case.name}" + (f" ({n} thr)" if n else ""))
    finally:
        torch.set_num_threads(restore)
    meta = metadata(device, dtype, amp, reps, heap)
    if device.type == "cpu":
        meta["threads"] = counts
    return dict(meta, rows=[asdict(r) for r in rows], failed=failed)


def metadata(device: torch.device, dtype: torch.dtype, amp: torch.dtype | None, reps: int,
             heap: bool | None) -> dict:
    """What a result file records besides its rows: the machine, the software, the commit, the
    date and how it was timed."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "autocast": str(amp).replace("torch.", "") if amp is not None else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "tokenmix": tokenmix.__version__,
        "cpu_capability": tokenmix.info()["cpu_capability"],
        "commit": git_commit(),
        "date": _dt.date.today().isoformat(),
        # Orders two runs of one day (UTC wall clock when the run finished).
        "time": _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S"),
        "reps": reps,
        "steady_heap": heap,
    }


def format_table(result: dict) -> str:
    wo = max([len(r["op"]) for r in result["rows"]] + [16]) + 2
    wc = max([len(r["case"]) for r in result["rows"]] + [42]) + 2
    head = (f"{'op':<{wo}}{'case':<{wc}}{'pass':<9}{'thr':>4}{'fused ms':>10}{'eager ms':>10}{'compile ms':>11}"
            f"{'x eager':>9}{'x compile':>10}{'GB/s':>8}{'% copy':>8}{'GFLOP/s':>9}{'% GEMM':>8}{'max err':>10}")
    amp = f", autocast {result['autocast']}" if result.get("autocast") else ""
    lines = [f"device: {result['device']} ({result['device_type']}, {result['dtype']}{amp}, "
             f"torch {result['torch']}, tokenmix {result['tokenmix']}, commit {result['commit']})",
             head, "-" * len(head)]
    for r in result["rows"]:
        comp = f"{r['compiled_ms']:.3f}" if r["compiled_ms"] else "-"
        xcomp = f"{r['speedup_vs_compiled']:.2f}" if r["speedup_vs_compiled"] else "-"
        gbps = f"{r['gbps']:.1f}" if r["gbps"] else "-"
        pct = f"{r['pct_of_copy']:.0f}%" if r["pct_of_copy"] else "-"
        gflops = f"{r['gflops']:.1f}" if r.get("gflops") else "-"
        pgemm = f"{r['pct_of_gemm']:.0f}%" if r.get("pct_of_gemm") else "-"
        thr = str(r.get("threads") or "-")
        lines.append(f"{r['op']:<{wo}}{r['case']:<{wc}}{r['mode']:<9}{thr:>4}{r['fused_ms']:>10.3f}"
                     f"{r['eager_ms']:>10.3f}{comp:>11}{r['speedup_vs_eager']:>9.2f}{xcomp:>10}"
                     f"{gbps:>8}{pct:>8}{gflops:>9}{pgemm:>8}{r['max_abs_err']:>10.1e}"
                     + (f"   fused/floor {r['extra']['fused_over_floor']:.2f}"
                        if r.get("extra", {}).get("fused_over_floor") else "")
                     + (f"   saved for backward {r['extra']['saved_mb_fused']:.1f} MB vs eager "
                        f"{r['extra']['saved_mb_eager']:.1f} MB" if "saved_mb_fused" in r.get("extra", {}) else ""))
    lines.append("GB/s: the op's minimum memory traffic over its time; % copy: that against a tensor "
                 "copy of the same bytes timed in the same rounds. GFLOP/s: the op's arithmetic over its "
                 "time; % GEMM: that against a square matrix product of the same dtype timed in the same "
                 "rounds. thr: CPU threads.")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def write_chart(result: dict, path: str) -> bool:
    """Speedup bars per case and pass; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    labels = [f"{r['op']}\n{r['mode']}" + (f" {r['threads']}t" if r.get("threads") else "") for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r["speedup_vs_eager"] for r in rows], w, label="vs eager")
    ax.bar([i + w / 2 for i in x], [r["speedup_vs_compiled"] or 0 for r in rows], w,
           label="vs torch.compile(eager)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("speedup of the fused op (x)")
    ax.set_title(f"tokenmix {result['tokenmix']} on {result['device']} ({result['dtype']}), "
                 f"{result['date']}", fontsize=9)
    ax.legend(fontsize=8)
    cases = sorted({f"{r['op']}: {r['case']}" for r in rows})
    fig.text(0.01, 0.01, "; ".join(cases), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
