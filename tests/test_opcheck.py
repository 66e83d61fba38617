"""torch.library.opcheck on every op: schema, autograd registration, fake kernel, AOT dispatch;
one case per sample of the registry (tokenmix.registry.samples), looked up by name."""
import pytest
import torch

from conftest import DEVICES, check_opcheck
from tokenmix import registry


def _leaf(a):
    if isinstance(a, list):
        return [_leaf(t) for t in a]
    return a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", registry.sample_names())
def test_opcheck(device, name):
    s = registry.sample(name, device)
    check_opcheck(s.overload, tuple(_leaf(a) for a in s.args), s.kwargs)
