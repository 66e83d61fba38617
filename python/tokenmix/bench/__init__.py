"""Benchmarks of every op family at the shapes of the backbones that use them
(``python -m tokenmix bench``)."""
from __future__ import annotations

from tokenmix.bench import gather
from tokenmix.bench.harness import Case, format_table, run, write_chart, write_json

# Per family: cases(batch) -> list[Case]; the CPU benchmark uses the small batch, CUDA the large.
FAMILIES = {"gather": gather.cases}
BATCH = {"cpu": 8, "cuda": 64}


def select_cases(ops: list[str] | None, device_type: str) -> list[Case]:
    """Cases of the named ops (or families); every op when `ops` is empty."""
    all_cases = [c for fam in FAMILIES.values() for c in fam(BATCH[device_type])]
    if not ops:
        return all_cases
    wanted = set(ops)
    known = {c.op for c in all_cases} | set(FAMILIES)
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [c for fam, build in FAMILIES.items() for c in build(BATCH[device_type])
            if c.op in wanted or fam in wanted]


__all__ = ["Case", "FAMILIES", "select_cases", "run", "format_table", "write_json", "write_chart"]
