"""torch.compile(fullgraph=True) over every op with no graph break, forward and backward; the
inductor backend on one representative case (its CPU codegen is slow on a 2-core machine)."""
import pytest

from conftest import DEVICES, check_compiles
from samples import all_samples

CASES = [(name, i) for i, (name, *_ ) in enumerate(all_samples("cpu"))]


def _as_fn(op, kwargs):
    return lambda *args: op(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,i", CASES, ids=[c[0] for c in CASES])
def test_compile_fullgraph(device, name, i):
    found = [c for c in all_samples(device) if c[0] == name]
    if not found:
        pytest.skip(f"{name} has no {device} kernel yet")
    _, op, args, kwargs = found[0]
    check_compiles(_as_fn(op, kwargs), args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_in_a_block(device):
    """A DynamicViT-style block fragment: score -> topk -> policy softmax, compiled by inductor."""
    import tokenmix.ops as tm

    def block(x, score, logits, policy):
        tokens, _ = tm.topk_tokens(x, score, 4, keep_first=1)
        attn = tm.policy_softmax(logits, policy)
        return tokens * 2, attn.sum(-1)

    _, _, (x, score, _), _ = all_samples(device)[2]
    _, _, (logits, policy, _), _ = all_samples(device)[3]
    check_compiles(block, (x, score, logits, policy), backend="inductor")
