"""torch.library.opcheck on every op: schema, autograd registration, fake kernel, AOT dispatch."""
import pytest
import torch

from conftest import DEVICES, check_opcheck
from samples import all_samples

CASES = [(name, i) for i, (name, *_ ) in enumerate(all_samples("cpu"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,i", CASES, ids=[c[0] for c in CASES])
def test_opcheck(device, name, i):
    found = [c for c in all_samples(device) if c[0] == name]
    if not found:
        pytest.skip(f"{name} has no {device} kernel yet")
    _, op, args, kwargs = found[0]
    def leaf(a):
        if isinstance(a, list):
            return [leaf(t) for t in a]
        return a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    args = tuple(leaf(a) for a in args)
    check_opcheck(op, args, kwargs)
