"""Benchmarks of every op family at the shapes of the backbones that use them
(``python -m tokenmix bench``)."""
from __future__ import annotations

from tokenmix.bench import deform_conv2d, gather, gnconv, window_attention
from tokenmix.bench.harness import Case, format_table, run, write_chart, write_json

# Per family: cases(batch) -> list[Case], and the batch each device runs them at.
FAMILIES = {"gather": gather.cases, "window_attention": window_attention.cases,
            "deform_conv2d": deform_conv2d.cases, "gnconv": gnconv.cases}
BATCH = {"gather": {"cpu": 8, "cuda": 64}, "window_attention": {"cpu": 4, "cuda": 64},
         "deform_conv2d": {"cpu": 4, "cuda": 64}, "gnconv": {"cpu": 4, "cuda": 64}}


def select_cases(ops: list[str] | None, device_type: str, quick: bool = False) -> list[Case]:
    """Cases of the named ops (or families); every op when `ops` is empty. `quick` leaves out the
    whole-model cases."""
    tagged = [(fam, c) for fam, build in FAMILIES.items() for c in build(BATCH[fam][device_type])
              if not (quick and c.heavy)]
    if not ops:
        return [c for _, c in tagged]
    wanted = set(ops)
    known = {c.op for _, c in tagged} | set(FAMILIES)
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [c for fam, c in tagged if c.op in wanted or fam in wanted]


__all__ = ["Case", "FAMILIES", "select_cases", "run", "format_table", "write_json", "write_chart"]
