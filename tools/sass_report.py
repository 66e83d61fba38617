"""Per-kernel report of tokenmix's compiled CUDA code, read from the built extension without a GPU:
registers, stack and local memory (spills), static shared memory (dynamic shared memory is set at
launch and not shown), global loads by width, subroutine calls and tensor-core instructions, for
one architecture's SASS.

    python tools/sass_report.py                      # the installed tokenmix._C, sm_90
    python tools/sass_report.py path/to/_C.so --arch sm_80 --match window_attention

What to read in it (the habits docs/building.md describes): hot load loops should issue 16-byte
loads (``ld16``) where alignment allows, not 2-byte ones (``ld2``); ``calls`` counts
``CALL.REL`` subroutine calls, which in these kernels are mostly 64-bit integer division and
remainder; ``local`` above zero means register spills; ``mma`` counts HMMA/HGMMA instructions.
CI prints the report after the CUDA build so that a change in any column shows in the log. The
report only reads; it exits 1 only when it cannot find cuobjdump or a CUDA fatbin.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Dict, List, Optional

# Global-load width in bytes from an LDG/LDGSTS modifier; plain LDG.E is 4 bytes.
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_WIDTHS = (16, 8, 4, 2, 1)


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, $CUDA_HOME/bin, or the copy Triton ships in this environment."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return None


def default_library() -> str:
    import tokenmix._C as ext
    return ext.__file__


def _demangle(names: List[str]) -> Dict[str, str]:
    """Readable kernel names: c++filt's, without namespaces, anonymous namespaces and parameter
    lists (the template arguments stay: they tell the dtype)."""
    out = {n: n for n in names}
    if shutil.which("c++filt") and names:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0:
            out = dict(zip(names, res.stdout.splitlines()))
    for k, v in out.items():
        v = re.sub(r"\(anonymous namespace\)::", "", v)
        v = re.sub(r"^(void )?", "", v)
        depth, cut = 0, len(v)
        for i, ch in enumerate(v):  # drop the parameter list: the last top-level "(...)"
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
        v = v[:cut]
        v = re.sub(r"\b[a-z_0-9]+::", "", v)
        out[k] = v
    return out


def resources(cuobjdump: str, lib: str, arch: str) -> Dict[str, dict]:
    """Per mangled kernel: its source file and the REG/STACK/SHARED/LOCAL figures."""
    text = subprocess.run([cuobjdump, "-res-usage", "-arch", arch, lib], capture_output=True, text=True).stdout
    out: Dict[str, dict] = {}
    source, name = "?", None
    for line in text.splitlines():
        m = re.match(r"identifier = (.*)", line.strip())
        if m:
            source = os.path.basename(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[name] = {"source": source, **{k.lower(): int(fields.get(k, 0))
                                               for k in ("REG", "STACK", "SHARED", "LOCAL")}}
            name = None
    return out


def instructions(cuobjdump: str, lib: str, arch: str) -> Dict[str, dict]:
    """Per mangled kernel: global loads by width, CALL.REL subroutine calls, MMA instructions."""
    text = subprocess.run([cuobjdump, "-sass", "-arch", arch, lib], capture_output=True, text=True).stdout
    out: Dict[str, dict] = defaultdict(lambda: {"ld": defaultdict(int), "calls": 0, "mma": 0})
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            continue
        if name is None:
            continue
        # LDGSTS is cp.async: a global load straight into shared memory.
        m = re.search(r"\b(LDG(?:STS)?(?:\.[A-Z0-9]+)*)\b", line)
        if m:
            width = 4
            for mod in m.group(1).split(".")[1:]:
                width = _WIDTH.get(mod, width)
            out[name]["ld"][width] += 1
        if "CALL.REL" in line:
            out[name]["calls"] += 1
        if re.search(r"\b[HID]G?MMA\b|\bHGMMA\.", line):
            out[name]["mma"] += 1
    return out


def report(lib: str, arch: str, match: Optional[str], cuobjdump: str) -> List[dict]:
    res = resources(cuobjdump, lib, arch)
    ins = instructions(cuobjdump, lib, arch)
    names = sorted(set(res) | set(ins))
    readable = _demangle(names)
    rows = []
    for n in names:
        r = res.get(n, {"source": "?", "reg": 0, "stack": 0, "shared": 0, "local": 0})
        i = ins.get(n, {"ld": {}, "calls": 0, "mma": 0})
        row = {"source": r["source"], "kernel": readable[n], **{k: r[k] for k in ("reg", "stack", "shared", "local")},
               **{f"ld{w}": i["ld"].get(w, 0) for w in _WIDTHS}, "calls": i["calls"], "mma": i["mma"]}
        if match is None or match in row["source"] or match in row["kernel"]:
            rows.append(row)
    return sorted(rows, key=lambda r: (r["source"], r["kernel"]))


def _short(name: str, width: int = 64) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def format_rows(rows: List[dict], arch: str, lib: str) -> str:
    rows = [dict(r, kernel=_short(r["kernel"])) for r in rows]
    wk = max([len(r["kernel"]) for r in rows] + [6]) + 2
    ws = max([len(r["source"]) for r in rows] + [6]) + 2
    cols = ["reg", "stack", "shared", "local"] + [f"ld{w}" for w in _WIDTHS] + ["calls", "mma"]
    head = f"{'source':<{ws}}{'kernel':<{wk}}" + "".join(f"{c:>8}" for c in cols)
    lines = [f"{arch} SASS of {lib}: {len(rows)} kernels", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['source']:<{ws}}{r['kernel']:<{wk}}" + "".join(f"{r[c]:>8}" for c in cols))
    total = {c: sum(r[c] for r in rows) for c in cols[4:]}
    lines.append(f"{'total':<{ws + wk}}" + " " * 32 + "".join(f"{total[c]:>8}" for c in cols[4:]))
    lines.append("ldN: global loads of N bytes (LDG and cp.async's LDGSTS, by width); calls: CALL.REL "
                 "subroutine calls (64-bit division and the like); local > 0: register spills; mma: tensor-core instructions.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("library", nargs="?", help="the extension (default: the installed tokenmix._C)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--match", help="only kernels whose source file or name contains this")
    args = ap.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("no cuobjdump (PATH, $CUDA_HOME/bin or Triton's copy)", file=sys.stderr)
        return 1
    lib = args.library or default_library()
    rows = report(lib, args.arch, args.match, cuobjdump)
    if not rows:
        print(f"no {args.arch} kernels in {lib} (a CPU-only build?)", file=sys.stderr)
        return 1
    print(format_rows(rows, args.arch, lib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
