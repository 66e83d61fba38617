"""torch.compile(fullgraph=True) over every op with no graph break, forward and backward, one case
per sample of the registry (by name); the inductor backend on one representative case (its CPU
codegen is slow on a 2-core machine)."""
import pytest

from conftest import DEVICES, check_compiles
from tokenmix import registry


def _as_fn(op, kwargs):
    return lambda *args: op(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", registry.sample_names())
def test_compile_fullgraph(device, name):
    s = registry.sample(name, device)
    check_compiles(_as_fn(s.overload, s.kwargs), s.args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_in_a_block(device):
    """A DynamicViT-style block fragment: score -> topk -> policy softmax, compiled by inductor."""
    import tokenmix.ops as tm

    def block(x, score, logits, policy):
        tokens, _ = tm.topk_tokens(x, score, 4, keep_first=1)
        attn = tm.policy_softmax(logits, policy)
        return tokens * 2, attn.sum(-1)

    x, score, _ = registry.sample("topk_tokens", device).args
    logits, policy, _ = registry.sample("policy_softmax", device).args
    check_compiles(block, (x, score, logits, policy), backend="inductor")
