"""Windowed attention (docs/api.md, "Windowed attention"): outputs and every gradient (q, k, v, bias_table) vs the
eager timm-style oracle, across shifts, window shapes, partial windows, global queries, head
sizes, packed-qkv views and dtypes; gradcheck; and every argument check."""
import pytest
import torch

import tokenmix.ops as tm
from conftest import DEVICES, check_against_oracle, check_gradcheck, check_raises, device_dtype_params
from tokenmix.reference.window_attention import window_attention as ref

GEN = torch.Generator().manual_seed(7)


def randn(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def make(B, H, W, heads, d, window, global_q=False, bias=True):
    wh, ww = (window, window) if isinstance(window, int) else window
    k, v = randn(B, H, W, heads, d), randn(B, H, W, heads, d)
    q = randn(B, wh, ww, heads, d) if global_q else randn(B, H, W, heads, d)
    table = 0.5 * randn((2 * wh - 1) * (2 * ww - 1), heads) if bias else None
    return q, k, v, table


def run_case(device, dtype, B, H, W, heads, d, window, shift, global_q=False, bias=True):
    q, k, v, table = make(B, H, W, heads, d, window, global_q, bias)
    inputs = [t.to(device) for t in (q, k, v)] + ([table.to(device)] if bias else [])

    def fused(q, k, v, *t):
        return tm.window_attention(q, k, v, window_size=window, shift_size=shift,
                                   bias_table=t[0] if t else None)

    def oracle(q, k, v, *t):
        return ref(q, k, v, window_size=window, shift_size=shift, bias_table=t[0] if t else None)

    check_against_oracle(fused, oracle, inputs, dtype)


# (B, H, W, heads, d, window, shift)
CASES = [
    (1, 14, 14, 3, 32, 7, 0),        # Swin W-MSA, batch 1
    (3, 14, 14, 2, 16, 7, 3),        # Swin SW-MSA, odd batch
    (2, 16, 16, 2, 8, 8, 4),
    (2, 12, 18, 2, 8, (4, 6), (2, 3)),  # rectangular window and shift
    (1, 24, 24, 1, 8, 12, 6),
    (1, 24, 24, 1, 32, 12, 6),       # head_dim 32 in a window of more than 64 tokens
    # head_dim 32 in windows of <= 64 tokens: the CUDA tensor-core forward, shifted and partial
    (2, 14, 14, 2, 32, 7, 3),
    (2, 13, 17, 2, 32, 7, 0),
    (1, 16, 16, 2, 32, 8, 4),
    (1, 28, 14, 2, 8, 14, 0),
    (2, 13, 17, 2, 8, 7, 0),         # partial border windows
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("B,H,W,heads,d,window,shift", CASES)
def test_window_attention(device, dtype, B, H, W, heads, d, window, shift):
    run_case(device, dtype, B, H, W, heads, d, window, shift)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("B,H,W,d", [(1, 14, 14, 16), (3, 14, 21, 16), (2, 13, 11, 32)])
def test_global_query(device, dtype, B, H, W, d):
    run_case(device, dtype, B, H, W, 2, d, 7, 0, global_q=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,W,window,shift,glob", [(13, 11, 7, 0, True),      # global q, partial windows
                                                   (14, 14, (7, 7), (0, 3), False),  # shift in one dim
                                                   (7, 7, 7, 3, False),       # one window, shifted
                                                   (7, 9, (7, 3), (3, 1), False)])
def test_edge_geometries(device, H, W, window, shift, glob):
    run_case(device, torch.float32, 2, H, W, 2, 8, window, shift, global_q=glob)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_no_bias_local_windows(device, dtype):
    """HAT-Net's local step: plain window attention, no bias."""
    run_case(device, dtype, 2, 16, 16, 2, 16, 8, 0, bias=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,d", [(1, 8), (2, 24), (4, 48), (1, 96), (2, 128), (32, 8)])
def test_head_sizes(device, heads, d):
    run_case(device, torch.float32, 1, 14, 14, heads, d, 7, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_qkv_views_are_read_in_place(device):
    B, H, W, heads, d = 2, 14, 14, 3, 16
    qkv = randn(B, H, W, 3 * heads * d).float().to(device)
    q, k, v = qkv.view(B, H, W, 3, heads, d).unbind(3)
    assert not q.is_contiguous() and q.stride(-1) == 1
    table = randn(169, heads).float().to(device)
    out = tm.window_attention(q, k, v, window_size=7, shift_size=3, bias_table=table)
    expected = ref(q, k, v, window_size=7, shift_size=3, bias_table=table)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous() and out.shape == (B, H, W, heads, d)


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale_and_explicit_scale(device):
    q, k, v, table = (t.float().to(device) for t in make(1, 7, 7, 2, 16, 7))
    torch.testing.assert_close(tm.window_attention(q, k, v, window_size=7, bias_table=table),
                               tm.window_attention(q, k, v, window_size=7, bias_table=table, scale=0.25))
    torch.testing.assert_close(tm.window_attention(q, k, v, window_size=7, scale=0.1),
                               ref(q, k, v, window_size=7, scale=0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for window, shift, glob, H, W in [(4, 2, False, 8, 8), ((3, 4), 0, False, 5, 7), (4, 0, True, 8, 4)]:
        q, k, v, table = (t.to(device) for t in make(1, H, W, 2, 4, window, glob))
        check_gradcheck(lambda q, k, v, t: tm.window_attention(q, k, v, window_size=window, shift_size=shift,
                                                               bias_table=t), [q, k, v, table])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward(device):
    q, k, v, table = (t.float().to(device).requires_grad_() for t in make(2, 14, 14, 2, 8, 7, True))
    grads = []
    for _ in range(2):
        out = tm.window_attention(q, k, v, window_size=7, bias_table=table)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, table)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_same_result_at_any_thread_count():
    # The CPU kernels split work the same way whatever the thread count, and reduce the bias-table
    # gradient over fixed chunks of windows.
    q, k, v, table = (t.float().requires_grad_() for t in make(2, 14, 14, 3, 32, 7))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = tm.window_attention(q, k, v, window_size=7, shift_size=3, bias_table=table)
            results.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v, table)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_underflowing_probabilities(device):
    # A third of the relative positions get a bias of -120: their probabilities underflow (the
    # AVX-512 CPU exp flushes those below 2^-125 to zero instead of returning denormals).
    q, k, v, table = make(2, 14, 14, 2, 32, 7)
    table[::3] -= 120
    inputs = [t.to(device) for t in (q, k, v, table)]
    check_against_oracle(lambda q, k, v, t: tm.window_attention(q, k, v, window_size=7, shift_size=3, bias_table=t),
                         lambda q, k, v, t: ref(q, k, v, window_size=7, shift_size=3, bias_table=t),
                         inputs, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_query(device):
    q, k, v, table = (t.float().to(device) for t in make(1, 14, 14, 2, 8, 7))
    q[0, 2, 3, 1, 0] = float("nan")
    out = tm.window_attention(q, k, v, window_size=7, shift_size=3, bias_table=table)
    expected = ref(q, k, v, window_size=7, shift_size=3, bias_table=table)
    assert torch.equal(out.isnan(), expected.isnan())
    assert out.isnan().any()


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    q, k, v, table = (t.float().to(device) for t in make(1, 14, 14, 2, 8, 7))
    f = tm.window_attention
    check_raises(ValueError, r"v must have the shape of k", f, q, k, v[:, :7], window_size=7)
    check_raises(ValueError, r"q must have the shape of k .* or be one window of global queries",
                 f, q[:, :5], k, v, window_size=7)
    check_raises(ValueError, r"q has head_dim 4, k has 8", f, q[:, :7, :7, :, :4], k, v, window_size=7)
    check_raises(ValueError, r"q has 1 heads, k has 2", f, q[:, :7, :7, :1], k, v, window_size=7)
    check_raises(ValueError, r"k must have 5 dimensions", f, q, k[0], v[0], window_size=7)
    check_raises(ValueError, r"a shifted window needs H % wh == 0 and W % ww == 0",
                 f, q[:, :13], k[:, :13], v[:, :13], window_size=7, shift_size=3)
    check_raises(ValueError, r"shift_size must lie in \[0, window_size\)", f, q, k, v, window_size=7, shift_size=7)
    check_raises(ValueError, r"bias_table must have shape \[\(2 wh - 1\) \* \(2 ww - 1\), heads\] = \[169, 2\], got \[121, 2\]",
                 f, q, k, v, window_size=7, bias_table=table[:121])
    check_raises(ValueError, r"window_size \(16, 16\) must not exceed the map", f, q, k, v, window_size=16)
    check_raises(ValueError, r"window_size must be positive", f, q, k, v, window_size=0)
    check_raises(TypeError, r"q must have the dtype of k \(Float\), got Double", f, q.double(), k, v, window_size=7)
    check_raises(TypeError, r"bias_table must be float32, float16, bfloat16 or float64, got Long", f, q, k, v,
                 window_size=7, bias_table=table.long())
    check_raises(TypeError, r"k must be float32, float16, bfloat16 or float64, got Long",
                 f, q.long(), k.long(), v.long(), window_size=7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device_cpu_vs_cuda():
    q, k, v, table = make(1, 14, 14, 2, 8, 7)
    check_raises(ValueError, r"q must be on the device of k", tm.window_attention, q.float(), k.float().cuda(),
                 v.float().cuda(), window_size=7)
    check_raises(ValueError, r"bias_table must be on the device of k", tm.window_attention, q.float().cuda(),
                 k.float().cuda(), v.float().cuda(), window_size=7, bias_table=table.float())
