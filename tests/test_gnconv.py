"""HorNet's recursive gated convolution (docs/api.md, "Recursive gated convolution"): outputs and every gradient vs the
eager oracle for orders 1-5 and HorNet's widths, odd maps, channels_last, other kernel sizes,
fp64 gradcheck, deterministic backward, the HorNet-keyed modules (GnConv, GlobalLocalFilter) and
every argument check."""
import pytest
import torch
import torch.nn.functional as F

import tokenmix.ops as tm
from conftest import DEVICES, check_against_oracle, check_gradcheck, check_raises, device_dtype_params
from tokenmix.nn import GlobalLocalFilter, GnConv
from tokenmix.reference import gnconv as ref
from tokenmix.reference.gnconv import gate_dims

GEN = torch.Generator().manual_seed(5)

# (dim, order, B, H, W): every order 1-5, HorNet's widths, odd maps, batch 1 and 3.
CONFIGS = [
    (64, 1, 3, 13, 17),
    (64, 2, 1, 13, 17),
    (128, 3, 3, 13, 17),
    (256, 4, 1, 13, 17),
    (512, 5, 3, 13, 17),
    (64, 5, 1, 13, 17),
    (128, 3, 2, 14, 21),   # rows a multiple of 7 but not of 8: the AVX-512 kernel's 7-wide strips
]


def make_params(dim, order, k=7):
    """The op's tensor operands in HorNet's shapes, scaled so activations stay O(1), fp64."""
    dims = gate_dims(dim, order)
    S = sum(dims)

    def w(*shape, fan_in):
        return torch.randn(*shape, generator=GEN, dtype=torch.float64) / fan_in ** 0.5

    def b(n):
        return 0.1 * torch.randn(n, generator=GEN, dtype=torch.float64)

    return ([w(2 * dim, dim, 1, 1, fan_in=dim), b(2 * dim), w(S, 1, k, k, fan_in=k * k / 3), b(S)]
            + [w(dims[i + 1], dims[i], 1, 1, fan_in=dims[i] / 3) for i in range(order - 1)]
            + [b(dims[i + 1]) for i in range(order - 1)]
            + [w(dim, dim, 1, 1, fan_in=dim), b(dim)])


def flat(fn, order, scale=1.0 / 3):
    """fn(x, *params) over the flat operand list (pw weights and biases spread out)."""
    n = order - 1

    def call(x, wi, bi, wd, bd, *rest):
        return fn(x, wi, bi, wd, bd, list(rest[:n]), list(rest[n:2 * n]), rest[2 * n], rest[2 * n + 1],
                  order=order, scale=scale)
    return call


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"d{c[0]}-o{c[1]}-b{c[2]}" for c in CONFIGS])
def test_gnconv(device, dtype, cfg):
    dim, order, B, H, W = cfg
    x = torch.randn(B, dim, H, W, generator=GEN, dtype=torch.float64)
    inputs = [t.to(device) for t in [x] + make_params(dim, order)]
    check_against_oracle(flat(tm.gnconv, order), flat(ref.gnconv, order), inputs, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_channels_last_kept(device, dtype):
    dim, order = 32, 3
    x = torch.randn(2, dim, 9, 11, generator=GEN, dtype=torch.float64).to(memory_format=torch.channels_last)
    inputs = [t.to(device) for t in [x] + make_params(dim, order)]

    def fused(*a):
        out = flat(tm.gnconv, order)(*a)
        assert out.is_contiguous(memory_format=torch.channels_last)
        return out
    check_against_oracle(fused, flat(ref.gnconv, order), inputs, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_other_kernel_sizes(device, k):
    dim, order = 16, 2
    x = torch.randn(2, dim, 6, 10, generator=GEN, dtype=torch.float64)
    inputs = [t.to(device) for t in [x] + make_params(dim, order, k)]
    check_against_oracle(flat(tm.gnconv, order, 0.5), flat(ref.gnconv, order, 0.5), inputs, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_view(device):
    dim, order = 16, 2
    big = torch.randn(2, 2 * dim, 7, 9, generator=GEN, dtype=torch.float64)
    params = make_params(dim, order)
    out = flat(tm.gnconv, order)(big[:, ::2].to(device), *[p.to(device) for p in params])
    torch.testing.assert_close(out.cpu(), flat(ref.gnconv, order)(big[:, ::2], *params))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    # A 7x7 kernel over 5x6 maps: every tap crosses the border somewhere.
    for dim, order, k, shape in [(8, 2, 7, (1, 5, 6)), (8, 3, 3, (2, 4, 5)), (4, 1, 5, (2, 3, 3))]:
        x = torch.randn(shape[0], dim, *shape[1:], generator=GEN, dtype=torch.float64)
        check_gradcheck(flat(tm.gnconv, order), [t.to(device) for t in [x] + make_params(dim, order, k)])


# Maps wide enough that the CPU kernel splits each image into several bands of rows, whose
# depthwise halos reach into the neighbouring bands' rows of proj_in's output; k=11 over 3-row
# bands reaches two bands away.
MULTI_BAND = [(32, 3, 3, 61, 60, 7), (8, 2, 2, 23, 300, 11)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", MULTI_BAND, ids=[f"{c[3]}x{c[4]}-k{c[5]}" for c in MULTI_BAND])
def test_gnconv_multi_band(dtype, cfg):
    dim, order, B, H, W, k = cfg
    x = torch.randn(B, dim, H, W, generator=GEN, dtype=torch.float64)
    check_against_oracle(flat(tm.gnconv, order), flat(ref.gnconv, order), [x] + make_params(dim, order, k), dtype)


def test_gnconv_large_map():
    # One image's projection above the 8 MB a CPU thread keeps between calls.
    dim, order = 64, 2
    x = torch.randn(1, dim, 124, 124, generator=GEN, dtype=torch.float64)
    params = make_params(dim, order)
    with torch.no_grad():
        out = flat(tm.gnconv, order)(x.float(), *[p.float() for p in params])
        exact = flat(ref.gnconv, order)(x, *params)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,H,W", [(3, 20, 23), (3, 61, 60)])
def test_deterministic(B, H, W):
    # Forward and backward bit for bit the same on 1, 2 and 3 threads, also when images have
    # several bands that threads share out.
    dim, order = 32, 3
    ins = [t.float().requires_grad_() for t in [torch.randn(B, dim, H, W, generator=GEN)] + make_params(dim, order)]
    runs = []
    for threads in (1, 2, 3):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = flat(tm.gnconv, order)(*ins)
            runs.append((out.detach(),) + torch.autograd.grad(out.square().sum(), ins))
        finally:
            torch.set_num_threads(prev)
    for run in runs[1:]:
        for a, c in zip(runs[0], run):
            assert torch.equal(a, c)


def test_empty_batch():
    dim, order = 8, 2
    ins = [t.float().requires_grad_() for t in [torch.randn(0, dim, 5, 5)] + make_params(dim, order)]
    out = flat(tm.gnconv, order)(*ins)
    assert out.shape == (0, dim, 5, 5)
    grads = torch.autograd.grad(out.sum(), ins, allow_unused=True)
    assert all(g is not None and not g.any() for g in grads)


# ---- modules ---------------------------------------------------------------------------------


def hornet_state(dim, order, k=7):
    """A random state_dict with HorNet's gnconv key names."""
    params = make_params(dim, order, k)
    n = order - 1
    state = {"proj_in.weight": params[0], "proj_in.bias": params[1], "dwconv.weight": params[2],
             "dwconv.bias": params[3], "proj_out.weight": params[-2], "proj_out.bias": params[-1]}
    for i in range(n):
        state[f"pws.{i}.weight"] = params[4 + i]
        state[f"pws.{i}.bias"] = params[4 + n + i]
    return {key: v.float() for key, v in state.items()}


@pytest.mark.parametrize("order", [1, 3, 5])
def test_gnconv_module_loads_hornet_keys(order):
    dim = 64
    m = GnConv(dim, order=order)
    state = hornet_state(dim, order)
    assert set(m.state_dict()) == set(state)
    m.load_state_dict(state)
    eager = ref.GnConv(dim, order=order)
    eager.load_state_dict(state)
    x = torch.randn(2, dim, 10, 13, generator=GEN)
    torch.testing.assert_close(m(x), eager(x), rtol=1e-4, atol=1e-5)
    xc = x.to(memory_format=torch.channels_last)
    out = m(xc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-5)


def test_gnconv_module_trains():
    m = GnConv(32, order=3)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


def test_global_local_filter_keys_and_math():
    dim = 16
    gf = GlobalLocalFilter(dim, h=7, w=4)
    assert set(gf.state_dict()) == {"dw.weight", "complex_weight", "pre_norm.weight", "pre_norm.bias",
                                    "post_norm.weight", "post_norm.bias"}
    assert gf.complex_weight.shape == (dim // 2, 7, 4, 2)
    x = torch.randn(2, dim, 7, 7, generator=GEN)
    # An all-ones filter makes the global branch the identity; check the rest by hand.
    with torch.no_grad():
        gf.complex_weight.copy_(torch.stack([torch.ones(dim // 2, 7, 4), torch.zeros(dim // 2, 7, 4)], -1))
        gf.pre_norm.weight.normal_()
        gf.post_norm.bias.normal_()
    xn = F.layer_norm(x.permute(0, 2, 3, 1), (dim,), gf.pre_norm.weight, gf.pre_norm.bias, 1e-6).permute(0, 3, 1, 2)
    local = F.conv2d(xn[:, : dim // 2], gf.dw.weight, padding=1, groups=dim // 2)
    mixed = torch.stack([local, xn[:, dim // 2:]], 2).reshape(2, dim, 7, 7)
    expect = F.layer_norm(mixed.permute(0, 2, 3, 1), (dim,), gf.post_norm.weight, gf.post_norm.bias, 1e-6)
    torch.testing.assert_close(gf(x), expect.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_global_local_filter_resizes_its_filter_and_matches_a_dft():
    dim = 8
    gf = GlobalLocalFilter(dim, h=14, w=8)
    x = torch.randn(1, dim, 10, 12, generator=GEN, dtype=torch.float64)
    out = gf(x.float())
    assert out.shape == x.shape and out.dtype == torch.float32
    # Global branch by an explicit DFT with the bilinearly resized filter.
    xn = gf.pre_norm(x.float()).double()
    glob = xn[:, dim // 2:]
    wr = F.interpolate(gf.complex_weight.detach().double().permute(3, 0, 1, 2), size=(10, 7), mode="bilinear",
                       align_corners=True).permute(1, 2, 3, 0)
    filt = torch.complex(wr[..., 0], wr[..., 1])
    full = torch.zeros(dim // 2, 10, 12, dtype=torch.complex128)
    full[:, :, :7] = filt
    full[:, :, 7:] = filt[:, (-torch.arange(10)) % 10][:, :, 1:6].flip(-1).conj()  # Hermitian extension
    spec = torch.fft.fft2(glob, norm="ortho") * full
    g = torch.fft.ifft2(spec, norm="ortho").real
    torch.testing.assert_close(out[:, 1::2], gf.post_norm(torch.stack(
        [gf.dw(xn[:, :dim // 2].float()).double(), g], 2).reshape(1, dim, 10, 12).float())[:, 1::2],
        rtol=1e-4, atol=1e-4)


def test_gnconv_with_global_local_filter():
    dim, order = 32, 3
    m = GnConv(dim, order=order, gflayer=GlobalLocalFilter, h=6, w=4)
    assert "dwconv.complex_weight" in m.state_dict() and "dwconv.dw.weight" in m.state_dict()
    x = torch.randn(2, dim, 6, 6, requires_grad=True)
    out = m(x)
    dims = gate_dims(dim, order)
    fused = m.proj_in(x)
    expect = ref.gated_chain(fused, m.dwconv, [p.weight for p in m.pws], [p.bias for p in m.pws],
                             m.proj_out.weight, m.proj_out.bias, order, 1.0 / 3)
    assert fused.shape[1] == dims[0] + sum(dims)
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert m.dwconv.complex_weight.grad is not None


# ---- bad input ------------------------------------------------------------------------------


def test_bad_inputs():
    dim, order = 16, 3
    x = torch.randn(2, dim, 6, 6)
    p = [t.float() for t in make_params(dim, order)]
    f = flat(tm.gnconv, order)
    check_raises(ValueError, r"dim \(x.size\(1\) = 14\) must be a positive multiple of 2\*\*\(order-1\) = 4",
                 flat(tm.gnconv, order), torch.randn(2, 14, 6, 6), *p)
    check_raises(ValueError, r"proj_in_weight must have shape \[64, 32, 1, 1\], got \[32, 16, 1, 1\]",
                 f, torch.randn(2, 32, 6, 6), *p)
    check_raises(ValueError, r"dw_weight must have shape \[28, 1, 7, 7\], got \[27, 1, 7, 7\]",
                 f, x, p[0], p[1], p[2][:27], *p[3:])
    check_raises(ValueError, r"dw_weight must have shape \[28, 1, k, k\] with an odd k <= 31, got \[28, 1, 6, 6\]",
                 f, x, p[0], p[1], p[2][..., :6, :6], *p[3:])
    check_raises(ValueError, r"pw_weights\[1\] must have shape \[16, 8, 1, 1\], got \[8, 8, 1, 1\]",
                 f, x, *p[:5], p[5][:8], *p[6:])
    check_raises(ValueError, r"pw_biases\[0\] must have shape \[8\], got \[7\]", f, x, *p[:6], p[6][:7], *p[7:])
    check_raises(ValueError, r"pw_weights and pw_biases must hold order - 1 = 2 tensors each, got 1 and 2",
                 tm.gnconv, x, *p[:4], p[4:5], p[6:8], p[8], p[9], order=order, scale=1.0)
    check_raises(ValueError, r"order must be in \[1, 8\], got 9", tm.gnconv, x, *p[:4], [], [], p[8], p[9],
                 order=9, scale=1.0)
    check_raises(TypeError, r"proj_out_bias must have the dtype of x \(Float\), got Double", f, x, *p[:-1], p[-1].double())
    check_raises(ValueError, r"x must have 4 dimensions", f, x[0], *p)
    with pytest.raises(ValueError, match=r"dim \(24\) must be a multiple of 2\*\*\(order-1\) = 16"):
        GnConv(24, order=5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device_cpu_vs_cuda():
    dim, order = 8, 2
    p = [t.float() for t in make_params(dim, order)]
    check_raises(ValueError, r"proj_in_weight must be on the device of x", flat(tm.gnconv, order),
                 torch.randn(1, dim, 4, 4, device="cuda"), *p)
