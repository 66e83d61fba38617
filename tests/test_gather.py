"""Sparse-token gather family (docs/api.md, "Sparse-token gather"): outputs and every gradient vs the eager
DynamicViT oracle, fp64 gradcheck, awkward layouts, and every argument check."""
import pytest
import torch

import tokenmix.ops as tm
from conftest import (DEVICES, check_against_oracle, check_gradcheck, check_raises,
                      device_dtype_params)
from tokenmix.reference import gather as ref

GEN = torch.Generator().manual_seed(1234)


def randn(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def unique_index(B, N, K, device):
    return torch.stack([torch.randperm(N, generator=GEN)[:K] for _ in range(B)]).to(device)


# (B, N, C, K): batch 1 and odd batches, DeiT-S-like rows, tiny and odd channel counts.
SHAPES = [(1, 7, 5, 3), (3, 197, 384, 137), (2, 50, 3, 50), (5, 16, 64, 1)]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("B,N,C,K", SHAPES)
def test_gather_tokens(device, dtype, B, N, C, K):
    x = randn(B, N, C).to(device)
    index = torch.randint(0, N, (B, K), generator=GEN).to(device)  # duplicates included
    check_against_oracle(tm.gather_tokens, ref.gather_tokens, [x, index], dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_gather_tokens_heavy_duplicates(device, dtype):
    x = randn(2, 6, 33).to(device)
    index = torch.tensor([[0, 0, 0, 5, 0, 5, 5], [3, 3, 3, 3, 3, 3, 3]], device=device)
    check_against_oracle(tm.gather_tokens, ref.gather_tokens, [x, index], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_strided_views(device):
    base = randn(3, 20, 2, 16).to(device)
    x = base[:, ::2, 1, :]  # strided batch and token dims, unit channel stride
    index = torch.randint(0, 10, (3, 6), generator=GEN).to(device)
    torch.testing.assert_close(tm.gather_tokens(x, index), ref.gather_tokens(x, index))
    xt = randn(3, 16, 10).to(device).transpose(1, 2)  # channel stride != 1: copied first
    torch.testing.assert_close(tm.gather_tokens(xt, index), ref.gather_tokens(xt, index))
    wide_index = torch.randint(0, 10, (3, 12), generator=GEN).to(device)[:, ::2]
    torch.testing.assert_close(tm.gather_tokens(x, wide_index), ref.gather_tokens(x, wide_index))


@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_empty(device):
    x = randn(2, 5, 4).to(device)
    out = tm.gather_tokens(x, torch.empty(2, 0, dtype=torch.long, device=device))
    assert out.shape == (2, 0, 4)
    out = tm.gather_tokens(randn(2, 5, 0).to(device), torch.zeros(2, 3, dtype=torch.long, device=device))
    assert out.shape == (2, 3, 0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("B,N,C,K", SHAPES)
def test_scatter_tokens(device, dtype, B, N, C, K):
    x = randn(B, N, C).to(device)
    index = unique_index(B, N, K, device)
    src = randn(B, K, C).to(device)
    check_against_oracle(tm.scatter_tokens, ref.scatter_tokens, [x, index, src], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_tokens_leaves_input_alone(device):
    x = randn(2, 9, 4).to(device)
    before = x.clone()
    out = tm.scatter_tokens(x, unique_index(2, 9, 3, device), randn(2, 3, 4).to(device))
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("B,N,C,keep_first,k", [(1, 7, 5, 0, 3), (3, 197, 384, 1, 137),
                                                (2, 30, 8, 2, 28), (4, 9, 16, 1, 0)])
def test_topk_tokens(device, dtype, B, N, C, keep_first, k):
    x = randn(B, N, C).to(device)
    score = randn(B, N - keep_first).to(device)
    # Scores distinct in every dtype, so the selection itself is dtype-independent.
    score = torch.argsort(torch.rand(B, N - keep_first, generator=GEN), dim=1).double().to(device)
    check_against_oracle(lambda a, s: tm.topk_tokens(a, s, k, keep_first=keep_first),
                         lambda a, s: ref.topk_tokens(a, s, k, keep_first=keep_first), [x, score], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_tokens_ties_and_nan(device):
    x = randn(2, 9, 4).to(device)
    score = torch.tensor([[1.0, 3.0, 3.0, -1.0, 3.0, 0.0, 1.0, 2.0],
                          [0.0, float("nan"), 2.0, float("nan"), 2.0, -0.0, 0.0, 5.0]], device=device)
    tokens, index = tm.topk_tokens(x, score, 6, keep_first=1)
    _, expected = ref.topk_tokens(x, score, 6, keep_first=1)
    assert torch.equal(index, expected)
    assert index[0].tolist() == [0, 2, 3, 5, 8, 1, 7]
    assert index[1].tolist() == [0, 2, 4, 8, 3, 5, 1]
    assert torch.equal(tokens, ref.gather_tokens(x, index))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("B,H,N", [(1, 1, 5), (3, 2, 33), (2, 6, 197)])
def test_policy_softmax(device, dtype, B, H, N):
    logits = (3 * randn(B, H, N, N)).to(device)
    policy = torch.rand(B, N, generator=GEN, dtype=torch.float64)
    policy[:, ::3] = 0.0  # hard-dropped tokens, as in DynamicViT's binary policies
    policy[:, 1::3] = 1.0
    check_against_oracle(tm.policy_softmax, ref.policy_softmax, [logits, policy.to(device)], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_policy_softmax_non_contiguous_logits(device):
    logits = randn(2, 7, 3, 7).to(device).transpose(1, 2)
    policy = torch.rand(2, 7, generator=GEN, dtype=torch.float64).to(device)
    torch.testing.assert_close(tm.policy_softmax(logits, policy, 1e-3),
                               ref.policy_softmax(logits, policy, 1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = randn(2, 6, 3).to(device)
    dup = torch.tensor([[0, 5, 0, 2], [1, 1, 4, 3]], device=device)
    check_gradcheck(tm.gather_tokens, [x, dup])
    uniq = torch.tensor([[0, 5, 2], [1, 4, 3]], device=device)
    check_gradcheck(tm.scatter_tokens, [x, uniq, randn(2, 3, 3).to(device)])
    check_gradcheck(lambda a, s: tm.topk_tokens(a, s, 3, keep_first=1)[0], [x, randn(2, 5).to(device)])
    policy = torch.rand(2, 6, generator=GEN, dtype=torch.float64).to(device)
    check_gradcheck(lambda l, p: tm.policy_softmax(l, p, 1e-2), [randn(2, 2, 6, 6).to(device), policy])


@pytest.mark.parametrize("device", DEVICES)
def test_results_do_not_depend_on_thread_count(device):
    if device != "cpu":
        pytest.skip("thread count is a CPU setting")
    logits = randn(2, 3, 70, 70).float().requires_grad_()
    policy = torch.rand(2, 70, generator=GEN).requires_grad_()
    runs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tm.policy_softmax(logits, policy)
            grads = torch.autograd.grad(out, (logits, policy), torch.ones_like(out))
            runs.append((out, *grads))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- bad input: one test per check --------------------------------------------------------


def test_bad_index_values():
    _bad_index_values("cpu")


_BAD_INDEX_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_gather
{body}
"""


def _run_cuda(body: str, **env: str):
    """``body`` in a fresh process (a device-side assertion leaves the CUDA context unusable)."""
    import os
    import subprocess
    import sys
    script = _BAD_INDEX_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), body=body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_index_values_cuda():
    """CUDA checks index values on the device (no host sync): a bad one stops the kernel with a
    device-side assertion, reported at the next synchronisation; TOKENMIX_CUDA_CHECK_INDICES=1
    gives the CPU path's exact exceptions."""
    proc = _run_cuda("test_gather._bad_index_values('cuda')", TOKENMIX_CUDA_CHECK_INDICES="1")
    assert proc.returncode == 0, proc.stderr
    calls = {
        "gather": "tm.gather_tokens(x, torch.tensor([[0, 5], [1, 2]], device='cuda'))",
        "scatter": "tm.scatter_tokens(x, torch.tensor([[1, 1], [0, 2]], device='cuda'), torch.randn(2, 2, 3, device='cuda'))",
    }
    for name, call in calls.items():
        body = ("import tokenmix.ops as tm\n"
                "x = torch.randn(2, 5, 3, device='cuda')\n"
                f"{call}\n"
                "try:\n"
                "    torch.cuda.synchronize()\n"
                "except RuntimeError as e:\n"
                "    print('RAISED', e)\n")
        proc = _run_cuda(body)
        assert "RAISED" in proc.stdout and "assert" in proc.stdout.lower(), (name, proc.stdout, proc.stderr)
        assert "index entries must" in proc.stderr, (name, proc.stderr)


def _bad_index_values(device):
    x = randn(2, 5, 3).to(device)
    check_raises(IndexError, r"index entries must lie in \[0, 5\), got values in \[0, 5\]",
                 tm.gather_tokens, x, torch.tensor([[0, 5], [1, 2]], device=device))
    check_raises(IndexError, r"index entries must lie in \[0, 5\).*-1",
                 tm.gather_tokens, x, torch.tensor([[0, -1], [1, 2]], device=device))
    check_raises(IndexError, r"index entries must lie in \[0, 5\), got values in \[-2, 3\]",
                 tm.gather_tokens, x, torch.tensor([[0, -2], [3, 2]], dtype=torch.int32, device=device))
    check_raises(IndexError, r"got values in \[0, 9\]",
                 tm.gather_tokens, x, torch.tensor([[0, 1], [9, 2]], device=device).t())
    check_raises(IndexError, "scatter_tokens: index entries",
                 tm.scatter_tokens, x, torch.tensor([[7], [1]], device=device), randn(2, 1, 3).to(device))
    check_raises(ValueError, "index entries must be unique within each row",
                 tm.scatter_tokens, x, torch.tensor([[1, 1], [0, 2]], device=device), randn(2, 2, 3).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ranks_and_sizes(device):
    x = randn(2, 5, 3).to(device)
    idx = torch.zeros(2, 2, dtype=torch.long, device=device)
    check_raises(ValueError, r"x must have 3 dimensions \[B, N, C\] or 2 dimensions \[B, N\], got 4",
                 tm.gather_tokens, x[None], idx)
    check_raises(ValueError, r"x must have 3 dimensions \[B, N, C\], got 2", tm.scatter_tokens, x[0], idx,
                 randn(2, 2, 3).to(device))
    check_raises(ValueError, r"index must have 2 dimensions \[B, K\], got 1", tm.gather_tokens, x, idx[0])
    check_raises(ValueError, r"index.size\(0\) must equal x.size\(0\) = 2, got 3",
                 tm.gather_tokens, x, torch.zeros(3, 2, dtype=torch.long, device=device))
    check_raises(ValueError, r"src.size\(1\) must equal index.size\(1\) = 2, got 3",
                 tm.scatter_tokens, x, idx, randn(2, 3, 3).to(device))
    check_raises(ValueError, r"score.size\(1\) must equal N - keep_first = 4, got 5",
                 tm.topk_tokens, x, randn(2, 5).to(device), 2, keep_first=1)
    check_raises(ValueError, r"policy.size\(1\) must equal logits.size\(2\) = 5, got 4",
                 tm.policy_softmax, randn(2, 1, 5, 5).to(device), randn(2, 4).to(device))
    check_raises(ValueError, r"logits.size\(3\) must equal logits.size\(2\) = 5, got 4",
                 tm.policy_softmax, randn(2, 1, 5, 4).to(device), randn(2, 5).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_k(device):
    x = randn(2, 5, 3).to(device)
    check_raises(ValueError, r"k must lie in \[0, N - keep_first = 4\], got 5",
                 tm.topk_tokens, x, randn(2, 4).to(device), 5, keep_first=1)
    check_raises(ValueError, r"k must lie in .* got -1", tm.topk_tokens, x, randn(2, 5).to(device), -1)
    check_raises(ValueError, r"keep_first must lie in \[0, N = 5\], got 6",
                 tm.topk_tokens, x, randn(2, 5).to(device), 1, keep_first=6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_dtypes(device):
    x = randn(2, 5, 3).to(device)
    idx = torch.zeros(2, 2, dtype=torch.long, device=device)
    check_raises(TypeError, "index must be int64 or int32, got Short", tm.gather_tokens, x, idx.short())
    check_raises(TypeError, "x must be float32, float16, bfloat16 or float64, got Long",
                 tm.gather_tokens, x.long(), idx)
    check_raises(TypeError, r"src must have the dtype of x \(Double\), got Float",
                 tm.scatter_tokens, x, idx[:, :1], randn(2, 1, 3).float().to(device))
    check_raises(TypeError, "policy must be float32, float16, bfloat16 or float64, got Long",
                 tm.policy_softmax, randn(2, 1, 5, 5).to(device), randn(2, 5).long().to(device))


def test_bad_device_cpu_vs_meta():
    """Device mismatch without a GPU: a meta index next to CPU tokens."""
    x = randn(2, 5, 3)
    check_raises(ValueError, r"index must be on the device of x \(cpu\), got meta",
                 tm.gather_tokens, x, torch.zeros(2, 2, dtype=torch.long, device="meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device_cpu_vs_cuda():
    x = randn(2, 5, 3).cuda()
    idx = torch.zeros(2, 2, dtype=torch.long)
    check_raises(ValueError, r"index must be on the device of x \(cuda:0\), got cpu", tm.gather_tokens, x, idx)
    check_raises(ValueError, "score must be on the device of x", tm.topk_tokens, x, randn(2, 5), 2)
    check_raises(ValueError, "policy must be on the device of logits",
                 tm.policy_softmax, randn(2, 1, 5, 5).cuda(), randn(2, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_transposed_index(device, index_dtype):
    """A dense but non-contiguous index (a transposed one) is read by its strides: widening int32
    to int64 keeps the layout, which the kernels must not take for [B, K] rows."""
    x = randn(2, 5, 3).to(device)
    idx = torch.tensor([[0, 4], [1, 3], [2, 2]], dtype=index_dtype, device=device).t()
    assert not idx.is_contiguous()
    check_against_oracle(tm.gather_tokens, ref.batch_index_select, [x, idx], torch.float32)
    src = randn(2, 2, 3).to(device)
    unique = torch.tensor([[0, 1], [4, 2]], dtype=index_dtype, device=device).t()
    check_against_oracle(tm.scatter_tokens, ref.scatter_tokens, [x, unique, src], torch.float32)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("rank", [2, 3])
def test_gather_accepts_what_batch_index_select_accepts(device, dtype, index_dtype, rank):
    """DynamicViT's batch_index_select takes [B, N] or [B, N, C] and int32 or int64 indices."""
    x = randn(3, 11, 5)[..., 0] if rank == 2 else randn(3, 11, 5)
    idx = torch.randint(0, 11, (3, 7), generator=GEN).to(index_dtype)
    check_against_oracle(tm.gather_tokens, ref.batch_index_select, [x.to(device), idx.to(device)], dtype)
    out = tm.gather_tokens(x.to(device, dtype), idx.to(device))
    assert out.shape == ((3, 7) if rank == 2 else (3, 7, 5))
