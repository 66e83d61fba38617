"""Regenerate the generated tables of README.md and docs/performance.md from
benchmarks/results/*.json.

    python benchmarks/readme_table.py          # rewrite the tables between their markers
    python benchmarks/readme_table.py --check  # exit 1 if a table is out of date

Performance: for each (device, dtype, autocast dtype) the newest result file wins; every row names
the device and date that produced it. docs/performance.md lists every pass of every case; the
README one row per case (forward and forward+backward side by side) for the newest result of
each device in its first dtype (fp32 on CPU, fp16 on GPUs).

Models: the `bench --models` results (``"kind": "models"``), newest per device, dtype and batch,
one row per backbone.

Validation: the `*-validation.json` files record which kernels ran on which GPU at which commit
and what was checked; the table also says whether an op's CUDA code changed after that commit
(git history of its op folder).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _load(kind: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("kind", "benchmark") == kind:
            r["_file"] = os.path.relpath(path, ROOT)
            out.append(r)
    return out


def merged(kind: str, key: Callable[[dict], tuple]) -> list[dict]:
    """Per key(result), the newest run of every case (runs ordered by date, then time of day, files
    without a time first): the newest file that ran every case (no ``selection``) with the newer
    files that reran a selection of cases on top, a newer row
    replacing the row of the same (op, case, mode, threads). The merged result keeps the newest
    file's metadata; each row records the date and file it comes from (``_date``, ``_file``),
    ``_files`` all of them. Files older than the newest full run are not read."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(_load(kind), key=lambda r: (r["date"], r.get("time", ""), r["_file"])):
        groups.setdefault(key(r), []).append(r)
    out = []
    for runs in groups.values():
        full = [i for i, r in enumerate(runs) if not r.get("selection")]
        rows: dict[tuple, dict] = {}
        for r in runs[full[-1] if full else 0:]:
            for row in r["rows"]:
                rows[(row["op"], row["case"], row["mode"], row.get("threads"))] = dict(
                    row, _date=r["date"], _file=r["_file"])
        files = sorted({row["_file"] for row in rows.values()})
        out.append(dict(runs[-1], rows=list(rows.values()), _files=files,
                        date=max(row["_date"] for row in rows.values()) if rows else runs[-1]["date"]))
    return sorted(out, key=lambda r: (r["device_type"], r["device"], r["dtype"]))


def latest_results() -> list[dict]:
    return merged("benchmark", lambda r: (r["device"], r["device_type"], r["dtype"], r.get("autocast")))


def fmt(x, spec: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def saved(row: dict) -> str:
    extra = row.get("extra", {})
    if "saved_mb_fused" not in extra:
        return "–"
    return f"{extra['saved_mb_fused']:.1f} / {extra['saved_mb_eager']:.1f}"


def roof(row: dict | None) -> str:
    """A pass's distance from its roof: % of the same-run GEMM rate for compute-bound cases, % of
    a same-size copy's bandwidth for memory-bound ones."""
    if row is None:
        return "–"
    if row.get("pct_of_gemm"):
        return f"{row['pct_of_gemm']:.0f}% GEMM"
    if row.get("pct_of_copy"):
        return f"{row['pct_of_copy']:.0f}% copy"
    return "–"


def roofs(rows: list[dict] | None) -> str:
    """roof() of a pass at each thread count, the unit written once: "48 / 60% copy"."""
    cells = [roof(r) for r in rows or []]
    if not cells or all(c == "–" for c in cells):
        return "–"
    units = {c.split("% ", 1)[1] for c in cells if "% " in c}
    if len(units) == 1 and all("% " in c for c in cells):
        return " / ".join(c.split("%", 1)[0] for c in cells) + "% " + units.pop()
    return " / ".join(cells)


def per_threads(rows: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """rows grouped as {(op, case): {mode: [row at each thread count, in run order]}}."""
    out: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        out.setdefault((row["op"], row["case"]), {}).setdefault(row["mode"], []).append(row)
    return out


def joined(rows: list[dict] | None, key: str, spec: str = ".2f") -> str:
    """One cell for every thread count a pass ran at ("all / 1" on a CPU)."""
    if not rows:
        return "–"
    get = (lambda r: r.get("extra", {}).get(key[6:])) if key.startswith("extra.") else (lambda r: r.get(key))
    return " / ".join(fmt(get(r), spec) for r in rows)


def where(r: dict, row: dict) -> str:
    amp = f", autocast {r['autocast']}" if r.get("autocast") else ""
    return f"{r['device']} ({r['dtype']}{amp}, {row.get('_date', r['date'])})"


def sources(results: list[dict]) -> str:
    return ", ".join(f"`{f}`" for r in results for f in r.get("_files", [r["_file"]])) or "no results yet"


def full_table() -> str:
    """Every pass of every case, for docs/performance.md."""
    lines = ["| op | case | pass | device (dtype, date) | threads | fused ms | × eager | × torch.compile "
             "| % of copy BW | GFLOP/s | % of GEMM | × floor | saved for backward, fused / eager (MB) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results = latest_results()
    for r in results:
        for row in r["rows"]:
            lines.append(f"| `{row['op']}` | {row['case']} | {row['mode']} | {where(r, row)} | "
                         f"{fmt(row.get('threads'), 'd')} | "
                         f"{row['fused_ms']:.3f} | {row['speedup_vs_eager']:.2f} | "
                         f"{fmt(row['speedup_vs_compiled'], '.2f')} | "
                         f"{fmt(row['pct_of_copy'], '.0f', '%')} | {fmt(row.get('gflops'), '.1f')} | "
                         f"{fmt(row.get('pct_of_gemm'), '.0f', '%')} | "
                         f"{fmt(row.get('extra', {}).get('fused_over_floor'), '.2f')} | {saved(row)} |")
    lines.append("")
    lines.append(f"Source: {sources(results)}. Ratios are medians measured in one run "
                 "(fused, eager and compiled interleaved); `% of copy BW` compares the op's "
                 "minimum memory traffic with a tensor copy of the same size timed in the same run; "
                 "`% of GEMM` compares the op's arithmetic rate with a square matrix product of the same "
                 "dtype timed in the same rounds; `× floor` "
                 "is fused time over the time of the case's compute floor (lower is better); the last column "
                 "is what autograd keeps alive between forward and backward (inputs included).")
    return "\n".join(lines)


def summary_table() -> str:
    """One row per case, for the README: the newest result of each device in its first dtype."""
    chosen: dict[tuple, dict] = {}
    for r in latest_results():
        if r.get("autocast"):
            continue
        key = (r["device_type"], r["device"])
        first = "float32" if r["device_type"] == "cpu" else "float16"
        if r["dtype"] == first:
            chosen[key] = r
    lines = ["| op | case | device (dtype, threads, date) | fwd ms | fwd × eager | fwd × compile | fwd+bwd × eager "
             "| fwd+bwd × compile | roofline (fwd; fwd+bwd) | × floor (fwd) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in chosen.values():
        counts = r.get("threads")
        counts = " / ".join(map(str, counts)) if isinstance(counts, list) else counts
        for (op, case), p in per_threads(r["rows"]).items():
            f, fb = p.get("fwd"), p.get("fwd+bwd")
            date = (f or fb)[0].get("_date", r["date"])
            dev = f"{r['device']} ({r['dtype']}" + (f", {counts} thr" if counts else "") + f", {date})"
            lines.append(f"| `{op}` | {case} | {dev} | {joined(f, 'fused_ms', '.3f')} | "
                         f"{joined(f, 'speedup_vs_eager')} | {joined(f, 'speedup_vs_compiled')} | "
                         f"{joined(fb, 'speedup_vs_eager')} | {joined(fb, 'speedup_vs_compiled')} | "
                         f"{roofs(f)}{'; ' + roofs(fb) if fb else ''} | "
                         f"{joined(f, 'extra.fused_over_floor') if any(x.get('extra', {}).get('fused_over_floor') for x in f or []) else '–'} |")
    lines.append("")
    lines.append(f"Source: {sources(list(chosen.values()))}; every pass, dtype and column in "
                 "[docs/performance.md](docs/performance.md). Where a CPU result ran at several thread "
                 "counts, each cell lists them in the order the device column names (all cores first, "
                 "then one thread). Roofline: a compute-bound op's arithmetic rate as a share of a square "
                 "matrix product of the same dtype timed in the same run (% GEMM), a memory-bound op's "
                 "bandwidth as a share of a same-size tensor copy (% copy).")
    return "\n".join(lines)


def changed_since(commit: str, op: str) -> bool | None:
    """Whether the op's folder changed after `commit` (None: no git history here)."""
    from tokenmix import registry
    try:
        folder = registry.op(op).family_spec.source_dir
        out = subprocess.run(["git", "log", "--oneline", f"{commit}..HEAD", "--", folder],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def validation_table() -> str:
    """One row per GPU run: what ran, and which ops' code changed after it (those are unvalidated)."""
    lines = ["| GPU (arch, torch) | commit, date | checks | ops | changed since, not yet run on a GPU |",
             "|---|---|---|---|---|"]
    runs = _load("validation")
    for v in runs:
        state = {op: changed_since(v["commit"], op) for op in v["ops"]}
        changed = ", ".join(f"`{op}`" for op, c in state.items() if c) or "none"
        if any(c is None for c in state.values()):
            changed += " (no git history here to tell)"
        lines.append(f"| {v['device']} ({v['arch']}, torch {v['torch']}) | {v['commit']}, {v['date']} "
                     f"| {'; '.join(v['checks'])} | {', '.join(f'`{op}`' for op in v['ops'])} | {changed} |")
    lines.append("")
    lines.append(f"Source: {sources(runs)}. Every CUDA kernel compiles for sm_80 and sm_90 in CI; an op "
                 "whose folder changed after the listed commit has not been validated on a GPU in its "
                 "current form.")
    return "\n".join(lines)
def models_table() -> str:
    """The reference backbones end to end (``bench --models`` results): for each (device, dtype,
    autocast, batch) the newest file, one row per model."""
    results = merged("models", lambda r: (r["device"], r["device_type"], r["dtype"], r.get("autocast"), r["batch"]))
    lines = ["| model | device (dtype, batch, date) | fwd img/s | fwd × unfused | fwd × compile "
             "| fwd+bwd img/s | fwd+bwd × unfused | fwd+bwd × compile | time in tokenmix ops (fwd / fwd+bwd) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        amp = f", autocast {r['autocast']}" if r.get("autocast") else ""
        passes: dict[str, dict] = {}
        for row in r["rows"]:
            passes.setdefault(row["op"].replace(" (model)", ""), {})[row["mode"]] = row
        for name, p in passes.items():
            f, fb = p.get("fwd"), p.get("fwd+bwd")
            dev = f"{r['device']} ({r['dtype']}{amp}, B={r['batch']}, {(f or fb).get('_date', r['date'])})"
            lines.append(f"| `{name}` | {dev} | {fmt(f and f['extra']['images_per_s_fused'], '.1f')} | "
                         f"{fmt(f and f['speedup_vs_eager'], '.2f')} | {fmt(f and f['speedup_vs_compiled'], '.2f')} | "
                         f"{fmt(fb and fb['extra']['images_per_s_fused'], '.1f')} | "
                         f"{fmt(fb and fb['speedup_vs_eager'], '.2f')} | {fmt(fb and fb['speedup_vs_compiled'], '.2f')} | "
                         f"{fmt(f and 100 * f['extra']['tokenmix_share'], '.0f', '%')} / "
                         f"{fmt(fb and 100 * fb['extra']['tokenmix_share'], '.0f', '%')} |")
    lines.append("")
    lines.append(f"Source: {sources(results)}. fwd: eval mode; fwd+bwd: train mode, every parameter's "
                 "gradient; unfused: `fused=False`, the official eager token mixers with the same weights; "
                 "compile: `torch.compile` of the unfused model; the last column is the fused model's time "
                 "inside tokenmix ops (torch.profiler), which bounds what the ops can gain.")
    return "\n".join(lines)


def op_table() -> str:
    """The registry's op table, each op's GPU cell from the newest recorded run that covered it."""
    from tokenmix import registry
    cells: dict[str, str] = {}
    for v in sorted(_load("validation"), key=lambda v: v["date"]):
        for op in v["ops"]:
            changed = changed_since(v["commit"], op)
            cells[op] = f"{v['device'].replace('NVIDIA ', '')}, {v['commit']}" + (
                " (changed since: not yet rerun)" if changed else "")
    return registry.readme_op_table(cells)


# (file, begin marker, end marker, generator)
TABLES = [
    ("README.md", "<!-- op-table:begin (generated by benchmarks/readme_table.py) -->",
     "<!-- op-table:end -->", op_table),
    ("README.md", "<!-- perf-table:begin (generated by benchmarks/readme_table.py) -->",
     "<!-- perf-table:end -->", summary_table),
    ("README.md", "<!-- models-table:begin (generated by benchmarks/readme_table.py) -->",
     "<!-- models-table:end -->", models_table),
    ("README.md", "<!-- validation-table:begin (generated by benchmarks/readme_table.py) -->",
     "<!-- validation-table:end -->", validation_table),
    ("docs/performance.md", "<!-- perf-table:begin (generated by benchmarks/readme_table.py) -->",
     "<!-- perf-table:end -->", full_table),
]


def render(text: str, begin: str, end: str, body: str) -> str | None:
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    texts: dict[str, str] = {}
    for name, begin, end, gen in TABLES:
        path = os.path.join(ROOT, name)
        if name not in texts:
            with open(path) as f:
                texts[name] = f.read()
        new = render(texts[name], begin, end, gen())
        if new is None:
            print(f"{name} lacks the markers {begin}", file=sys.stderr)
            return 1
        if new != texts[name]:
            stale.append(name)
        texts[name] = new
    if args.check:
        if stale:
            print(f"stale: {sorted(set(stale))}; run benchmarks/readme_table.py", file=sys.stderr)
        return 1 if stale else 0
    for name, text in texts.items():
        with open(os.path.join(ROOT, name), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
