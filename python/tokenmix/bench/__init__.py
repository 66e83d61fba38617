"""Benchmarks of every op family at the shapes of the backbones that use them
(``python -m tokenmix bench``); which cases exist and at what batch comes from
``tokenmix.registry.FAMILIES``."""
from __future__ import annotations

from tokenmix import registry
from tokenmix.bench.harness import Case, format_table, run, write_chart, write_json


def select_cases(ops: list[str] | None, device_type: str, quick: bool = False) -> list[Case]:
    """Cases of the named ops (or families); every op when `ops` is empty. `quick` leaves out the
    whole-model cases.

    Raises:
        ValueError: a name that is neither a case's op nor a family.
    """
    tagged = [(name, c) for name, fam in registry.FAMILIES.items() for c in fam.bench_cases(device_type)
              if not (quick and c.heavy)]
    if not ops:
        return [c for _, c in tagged]
    wanted = set(ops)
    known = {c.op for _, c in tagged} | set(registry.FAMILIES)
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(known)}")
    return [c for fam, c in tagged if c.op in wanted or fam in wanted]


__all__ = ["Case", "select_cases", "run", "format_table", "write_json", "write_chart"]
