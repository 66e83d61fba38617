"""Deformable convolution (docs/api.md, "Deformable convolution"): outputs and every gradient vs the eager oracle and
torchvision, awkward offsets, both LIT and DCNv2 geometries, LIT's module and its keys, and every
argument check."""
import pytest
import torch
import torch.nn.functional as F

import tokenmix.ops as tm
from conftest import DEVICES, check_against_oracle, check_gradcheck, check_raises, device_dtype_params
from tokenmix.nn import DeformablePatchMerging
from tokenmix.reference.deform_conv2d import deform_conv2d as ref

try:
    from torchvision.ops import deform_conv2d as tv_deform_conv2d
except Exception:  # not installed, or built for another torch
    tv_deform_conv2d = None

GEN = torch.Generator().manual_seed(11)

# (B, Cin, H, W, Cout, k, stride, padding, dilation, offset_groups, groups, mask)
GEOMETRIES = [
    (1, 8, 8, 8, 6, 2, 2, 0, 1, 1, 1, False),    # LIT merge, batch 1
    (5, 8, 10, 6, 4, 2, 2, 0, 1, 2, 1, True),    # LIT merge, offset groups 2, DCNv2, batch 5
    (1, 4, 9, 7, 6, 3, 1, 1, 2, 1, 1, True),     # 3x3, stride 1, padding 1, dilation 2
    (5, 6, 7, 7, 6, 3, 1, 1, 2, 2, 1, False),
    (2, 6, 6, 5, 4, 3, 2, 1, 1, 3, 2, True),     # weight groups
]


def make(B, Cin, H, W, Cout, k, s, p, d, G, groups, use_mask, scale=3.0):
    Ho = (H + 2 * p - (d * (k - 1) + 1)) // s + 1
    Wo = (W + 2 * p - (d * (k - 1) + 1)) // s + 1
    x = torch.randn(B, Cin, H, W, generator=GEN, dtype=torch.float64)
    off = scale * torch.randn(B, 2 * G * k * k, Ho, Wo, generator=GEN, dtype=torch.float64)
    w = torch.randn(Cout, Cin // groups, k, k, generator=GEN, dtype=torch.float64) / (k * k)
    b = torch.randn(Cout, generator=GEN, dtype=torch.float64)
    m = torch.rand(B, G * k * k, Ho, Wo, generator=GEN, dtype=torch.float64) if use_mask else None
    return x, off, w, b, m


def _call(fn, s, p, d):
    return lambda x, off, w, b, *m: fn(x, off, w, b, stride=s, padding=p, dilation=d, mask=m[0] if m else None)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_deform_conv2d(device, dtype, geo):
    x, off, w, b, m = make(*geo)
    s, p, d = geo[6], geo[7], geo[8]
    inputs = [t.to(device) for t in (x, off, w, b)] + ([m.to(device)] if m is not None else [])
    check_against_oracle(_call(tm.deform_conv2d, s, p, d), _call(ref, s, p, d), inputs, dtype)


@pytest.mark.skipif(tv_deform_conv2d is None, reason="torchvision unavailable")
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_matches_torchvision(geo):
    x, off, w, b, m = make(*geo)
    s, p, d = geo[6], geo[7], geo[8]
    # Far outside the map and exactly on integer points, besides the random offsets.
    off[:, 0::4] = 40.0
    off[:, 1::7] = torch.round(off[:, 1::7])
    ins = [t.requires_grad_() for t in (x, off, w, b)] + ([m.requires_grad_()] if m is not None else [])
    ours = tm.deform_conv2d(x, off, w, b, s, p, d, mask=m)
    theirs = tv_deform_conv2d(x, off, w, b, (s, s), (p, p), (d, d), mask=m)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ours)
    for a, c in zip(torch.autograd.grad(ours, ins, g), torch.autograd.grad(theirs, ins, g)):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_oracle_on_integer_points(device, geo):
    """Every sampling point on the grid, many exactly one pixel outside the map (y or x = -1),
    where the value is zero but the derivative is torchvision's one-sided one: the oracle agrees
    with the op there, which matters because low-precision inputs land on such points often."""
    x, off, w, b, m = make(*geo)
    s, p, d = geo[6], geo[7], geo[8]
    inputs = [t.to(device) for t in (x, torch.round(off), w, b)] + ([m.to(device)] if m is not None else [])
    check_against_oracle(_call(tm.deform_conv2d, s, p, d), _call(ref, s, p, d), inputs, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30])
def test_non_finite_and_huge_offsets_read_zero(device, bad):
    """The documented rule (docs/api.md): a sample position that is NaN, infinite or two pixels
    or more outside the map reads zero and gets zero gradients, as any position outside the map
    does. Forward and every gradient equal the oracle's with those offsets moved far outside the
    map (1e4), and stay finite."""
    x, off, w, b, m = make(*GEOMETRIES[1])
    bad_off = off.clone()
    bad_off[:, 0::3] = bad
    far = off.clone()
    far[:, 0::3] = 1e4
    fn = _call(tm.deform_conv2d, 2, 0, 1)
    ins = [t.to(device).requires_grad_() for t in (x, bad_off, w, b, m)]
    out = fn(*ins)
    out.sum().backward()
    want_ins = [t.to(device).requires_grad_() for t in (x, far, w, b, m)]
    want = _call(ref, 2, 0, 1)(*want_ins)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for got_t, want_t in zip(ins, want_ins):
        assert torch.isfinite(got_t.grad).all()
        torch.testing.assert_close(got_t.grad, want_t.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_offsets_equal_conv2d(device):
    x, off, w, b = (t.to(device) for t in make(2, 8, 12, 10, 6, 3, 1, 1, 2, 2, 1, False)[:4])
    out = tm.deform_conv2d(x, torch.zeros_like(off), w, b, padding=1, dilation=2)
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1, dilation=2))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for geo in [(1, 2, 5, 4, 2, 2, 2, 0, 1, 1, 1, True), (2, 4, 4, 4, 2, 3, 1, 1, 1, 2, 2, True)]:
        x, off, w, b, m = (t.to(device) for t in make(*geo, scale=1.3))
        s, p, d = geo[6], geo[7], geo[8]
        # CUDA scatters the input gradient with atomic adds: fp64 sums in any order
        check_gradcheck(_call(tm.deform_conv2d, s, p, d), [x, off, w, b, m],
                        nondet_tol=1e-12 if device == "cuda" else 0.0)


def test_deterministic_backward():
    x, off, w, b, m = (t.float().requires_grad_() for t in make(3, 8, 10, 10, 8, 3, 1, 1, 1, 2, 1, True))
    runs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = tm.deform_conv2d(x, off, w, b, padding=1, mask=m)
            runs.append(torch.autograd.grad(out.square().sum(), (x, off, w, b, m)))
        finally:
            torch.set_num_threads(prev)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_lit_patch_merging_keys_and_math():
    torch.manual_seed(0)
    merge = DeformablePatchMerging(8, 16, kernel_size=2)
    lit_keys = {"dconv.weight", "dconv.bias", "dconv.conv_offset.weight", "dconv.conv_offset.bias",
                "norm_layer.weight", "norm_layer.bias", "norm_layer.running_mean", "norm_layer.running_var",
                "norm_layer.num_batches_tracked"}
    assert set(merge.state_dict()) == lit_keys
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in merge.state_dict().items()}
    state["norm_layer.running_var"] = state["norm_layer.running_var"].abs() + 0.5
    merge.load_state_dict(state)
    merge.eval()
    x = torch.randn(3, 8, 12, 10)
    tokens = merge(x)
    assert tokens.shape == (3, 6 * 5, 16)
    off = F.conv2d(x, state["dconv.conv_offset.weight"], state["dconv.conv_offset.bias"], stride=2)
    y = ref(x, off, state["dconv.weight"], state["dconv.bias"], stride=2)
    y = F.batch_norm(y, state["norm_layer.running_mean"], state["norm_layer.running_var"],
                     state["norm_layer.weight"], state["norm_layer.bias"], False, 0.0, 1e-5)
    torch.testing.assert_close(tokens, F.gelu(y).flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_lit_patch_merging_starts_as_plain_conv_and_trains():
    merge = DeformablePatchMerging(4, 8).train()
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    merge(x).sum().backward()
    assert merge.dconv.conv_offset.weight.grad is not None and x.grad is not None


# ---- bad input ------------------------------------------------------------------------------


def test_bad_inputs():
    x, off, w, b, m = (t.float() for t in make(2, 8, 8, 8, 6, 3, 1, 1, 1, 2, 1, True))
    f = tm.deform_conv2d
    check_raises(ValueError, r"offset must have 2 \* offset_groups \* kh \* kw channels \(a multiple of 18\), got 17",
                 f, x, off[:, :17], w, b, padding=1)
    check_raises(ValueError, r"mask.size\(1\) must equal offset_groups \* kh \* kw = 18, got 9",
                 f, x, off, w, b, padding=1, mask=m[:, :9])
    check_raises(ValueError, r"mask.size\(2\) must equal H_out = 8, got 7", f, x, off, w, b, padding=1, mask=m[:, :, :7])
    check_raises(ValueError, r"input channels 8 must be divisible by the 3 offset groups",
                 f, x, torch.zeros(2, 54, 8, 8), w, b, padding=1)
    check_raises(ValueError, r"the output size \(-1, -1\) is not positive",
                 f, x[:, :, :1, :1], off, w, b)
    check_raises(ValueError, r"offset.size\(2\) must equal H_out = 6, got 8", f, x, off, w, b)
    check_raises(ValueError, r"input channels 8 must be a multiple of weight.size\(1\) = 3", f, x, off, w[:, :3], b, padding=1)
    check_raises(ValueError, r"bias.size\(0\) must equal weight.size\(0\) = 6, got 5", f, x, off, w, b[:5], padding=1)
    check_raises(TypeError, r"offset must have the dtype of input \(Float\), got Double", f, x, off.double(), w, b, padding=1)
    check_raises(ValueError, r"input must have 4 dimensions", f, x[0], off, w, b, padding=1)
    check_raises(ValueError, r"stride must be positive", f, x, off, w, b, stride=0, padding=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device_cpu_vs_cuda():
    x, off, w, b, _ = make(1, 4, 8, 8, 4, 2, 2, 0, 1, 1, 1, False)
    x, off, w, b = x.float(), off.float(), w.float(), b.float()
    check_raises(ValueError, r"offset must be on the device of input", tm.deform_conv2d, x.cuda(), off, w.cuda(),
                 b.cuda(), stride=2)
