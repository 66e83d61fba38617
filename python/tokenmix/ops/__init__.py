"""Functional API: one module per op family (``tokenmix.ops.<family>``, ``torch.ops.tokenmix.*``
underneath). What is exported here comes from the op registry: every registered op's wrapper,
looked up in its family's module, so a new family needs no edit here."""
from importlib import import_module as _import

from tokenmix.registry import OPS as _OPS

__all__ = list(_OPS)

for _name, _spec in _OPS.items():
    globals()[_name] = getattr(_import(f"tokenmix.ops.{_spec.family}"), _name)
