"""No op's CUDA path synchronises with the host: every registry sample runs forward and backward
on CUDA under ``torch.cuda.set_sync_debug_mode("error")``, which turns any synchronising call made
through torch (a scalar read, a copy to the host, a stream synchronisation) into an error."""
import pytest
import torch

from tokenmix import registry

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("name", registry.sample_names())
def test_no_host_sync(name):
    s = registry.sample(name, "cuda")
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in s.args]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = s.overload(*args, **s.kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
