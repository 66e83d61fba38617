"""Shifted and rearranged token mixing (docs/api.md, "Shifted / rearranged token mixing"): every op
and every gradient vs the eager oracle in every dtype; shifts zero, negative and beyond the map in
both modes, AS-MLP's chunked groups (a smaller last group), CycleFC's one group per channel; region
folds along rows and columns with regions that do not divide the axis (Hire-MLP), region 1 and the
whole axis (RaftMLP); the fold/unfold round trip and the fold's adjoint; the fused projections with
both weight layouts, with and without bias; channels_last and strided views; fp64 gradcheck; and
every argument check."""
import re

import pytest
import torch

import tokenmix.ops.shift as tm
from conftest import DEVICES, check_against_oracle, check_gradcheck, check_raises, device_dtype_params
from tokenmix.reference import shift as ref

GEN = torch.Generator().manual_seed(11)
CL = torch.channels_last
MODES = ["zeros", "circular"]


def randn(*shape, scale=1.0):
    return scale * torch.randn(*shape, generator=GEN, dtype=torch.float64)


def flat(pairs):
    return [int(v) for p in pairs for v in p]


def weight(cout, k, form):
    """A [cout, k] weight scaled by 1/sqrt(k), as [cout, k] ("2d") or [cout, k, 1, 1] ("4d")."""
    w = randn(cout, k, scale=k ** -0.5)
    return w if form == "2d" else w.reshape(cout, k, 1, 1)


# ---- channel-group shifts -------------------------------------------------------------------

# (id, B, C, H, W, shifts, groups)
SHIFTS = [
    ("asmlp-chunk-h", 2, 10, 6, 7, [(-1, 0), (0, 0), (1, 0)], [4, 4, 2]),      # torch.chunk(10, 3)
    ("asmlp-chunk-w", 3, 10, 7, 5, [(0, -2), (0, -1), (0, 0), (0, 1), (0, 2)], [2, 2, 2, 2, 2]),
    ("cyclefc", 1, 6, 5, 8, [(-1, 0), (0, 1), (1, 0), (0, -1), (2, -1), (-3, 2)], None),  # G = C
    ("beyond-map", 2, 8, 5, 4, [(7, -9), (5, 4), (-5, 0), (-4, -13)], None),    # |shift| >= the map
    ("equal-3", 3, 9, 9, 6, [(2, -3), (-1, 1), (0, 0)], None),
    ("single-group", 1, 4, 6, 6, [(-2, 3)], None),
    ("zero", 2, 4, 5, 5, [(0, 0), (0, 0)], [1, 3]),
]
SHIFT_IDS = [c[0] for c in SHIFTS]


def shift_fns(pairs, groups, mode):
    def fused(x):
        return tm.shift_tokens(x, pairs, groups, mode)

    def oracle(x):
        return ref.shift_tokens(x, flat(pairs), groups or [], mode)
    return fused, oracle


def shift_linear_fns(pairs, groups, mode):
    def fused(x, w, b=None):
        return tm.shift_linear(x, pairs, w, b, groups, mode)

    def oracle(x, w, b=None):
        return ref.shift_linear(x, flat(pairs), w, b, groups or [], mode)
    return fused, oracle


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", SHIFTS, ids=SHIFT_IDS)
def test_shift_tokens(device, dtype, mode, cfg):
    _, B, C, H, W, pairs, groups = cfg
    check_against_oracle(*shift_fns(pairs, groups, mode), [randn(B, C, H, W).to(device)], dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form,bias", [("2d", True), ("4d", True), ("2d", False), ("4d", False)])
@pytest.mark.parametrize("cfg", SHIFTS[:5], ids=SHIFT_IDS[:5])
def test_shift_linear(device, dtype, mode, form, bias, cfg):
    _, B, C, H, W, pairs, groups = cfg
    cout = C + 3
    inputs = [randn(B, C, H, W), weight(cout, C, form)] + ([randn(cout, scale=0.1)] if bias else [])
    check_against_oracle(*shift_linear_fns(pairs, groups, mode), [t.to(device) for t in inputs], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_shift_tokens_exact(device):
    # Pure data movement: the output is x's values, bit for bit (also in bf16).
    x = randn(2, 10, 6, 7).to(device, torch.bfloat16)
    for mode in MODES:
        for pairs, groups in [([(-1, 0), (0, 0), (1, 0)], [4, 4, 2]), ([(0, 0)], None), ([(9, -9), (2, 3)], None)]:
            torch.testing.assert_close(tm.shift_tokens(x, pairs, groups, mode),
                                       ref.shift_tokens(x, flat(pairs), groups or [], mode), rtol=0, atol=0)


# ---- region fold / unfold -------------------------------------------------------------------

# (id, B, C, H, W, axis, region, shift)
REGIONS = [
    ("h28-p3", 2, 3, 28, 5, 2, 3, 1),       # Hire-MLP stage 2: 28 rows, p = 3
    ("w28-p3", 1, 2, 4, 28, 3, 3, -2),
    ("h14-p3", 3, 4, 14, 6, 2, 3, 0),
    ("w14-p3", 2, 3, 5, 14, 3, 3, 2),
    ("h7-p2", 2, 4, 7, 7, 2, 2, -1),
    ("w7-p2", 3, 4, 6, 7, 3, 2, 1),
    ("h-p1", 2, 3, 5, 7, 2, 1, 3),          # region 1
    ("w-p1", 1, 3, 5, 7, 3, 1, -2),
    ("h-pL", 2, 3, 6, 5, 2, 6, 2),          # region = L (RaftMLP)
    ("w-pL", 1, 4, 5, 9, 3, 9, -4),
    ("h-shift>L", 2, 3, 7, 6, 2, 2, 17),
    ("w-shift<-L", 2, 3, 5, 7, 3, 3, -23),
    ("h-shift=L", 2, 2, 6, 7, 2, 4, 6),
]
REGION_IDS = [c[0] for c in REGIONS]


def folded_shape(B, C, H, W, axis, p):
    A = -(-(H if axis == 2 else W) // p)
    return (B, C * p, A, W) if axis == 2 else (B, C * p, H, A)


def fold_fns(axis, p, shift):
    return (lambda x: tm.region_fold(x, axis, p, shift)), (lambda x: ref.region_fold(x, axis, p, shift))


def unfold_fns(axis, p, L, shift):
    return (lambda y: tm.region_unfold(y, axis, p, L, shift)), (lambda y: ref.region_unfold(y, axis, p, L, shift))


def fold_linear_fns(axis, p, shift):
    return (lambda x, w, b=None: tm.region_fold_linear(x, axis, p, w, b, shift),
            lambda x, w, b=None: ref.region_fold_linear(x, axis, p, w, b, shift))


def linear_unfold_fns(axis, p, L, shift):
    return (lambda y, w, b=None: tm.linear_region_unfold(y, axis, p, L, w, b, shift),
            lambda y, w, b=None: ref.linear_region_unfold(y, axis, p, L, w, b, shift))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("cfg", REGIONS, ids=REGION_IDS)
def test_region_fold(device, dtype, cfg):
    _, B, C, H, W, axis, p, shift = cfg
    check_against_oracle(*fold_fns(axis, p, shift), [randn(B, C, H, W).to(device)], dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("cfg", REGIONS, ids=REGION_IDS)
def test_region_unfold(device, dtype, cfg):
    _, B, C, H, W, axis, p, shift = cfg
    L = H if axis == 2 else W
    check_against_oracle(*unfold_fns(axis, p, L, shift), [randn(*folded_shape(B, C, H, W, axis, p)).to(device)],
                         dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("cfg", REGIONS, ids=REGION_IDS)
def test_region_round_trip(device, dtype, cfg):
    _, B, C, H, W, axis, p, shift = cfg
    x = randn(B, C, H, W).to(device, dtype)
    y = tm.region_fold(x, axis, p, shift)
    assert y.shape == folded_shape(B, C, H, W, axis, p)
    assert torch.equal(tm.region_unfold(y, axis, p, x.shape[axis], shift), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", REGIONS, ids=REGION_IDS)
def test_region_adjoint(device, cfg):
    # <fold(x), g> == <x, fold_backward(g)>: the padded copies' gradients add into their sources;
    # <unfold(y), g> == <y, unfold_backward(g)>: cropped positions get none.
    _, B, C, H, W, axis, p, shift = cfg
    L = H if axis == 2 else W
    x = randn(B, C, H, W).to(device)
    g = randn(*folded_shape(B, C, H, W, axis, p)).to(device)
    fb = torch.ops.tokenmix.region_fold_backward(g, axis, p, L, shift)
    assert fb.shape == x.shape
    torch.testing.assert_close((tm.region_fold(x, axis, p, shift) * g).sum(), (x * fb).sum(), rtol=1e-12, atol=1e-12)
    ub = torch.ops.tokenmix.region_unfold_backward(x, axis, p, shift)
    assert ub.shape == g.shape
    torch.testing.assert_close((tm.region_unfold(g, axis, p, L, shift) * x).sum(), (g * ub).sum(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("form,bias", [("2d", True), ("4d", False)])
@pytest.mark.parametrize("cfg", REGIONS, ids=REGION_IDS)
def test_region_fold_linear(device, dtype, form, bias, cfg):
    _, B, C, H, W, axis, p, shift = cfg
    cout = 2 * C + 1
    inputs = [randn(B, C, H, W), weight(cout, C * p, form)] + ([randn(cout, scale=0.1)] if bias else [])
    check_against_oracle(*fold_linear_fns(axis, p, shift), [t.to(device) for t in inputs], dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("form,bias", [("4d", True), ("2d", False)])
@pytest.mark.parametrize("cfg", REGIONS, ids=REGION_IDS)
def test_linear_region_unfold(device, dtype, form, bias, cfg):
    _, B, C, H, W, axis, p, shift = cfg
    L = H if axis == 2 else W
    cin = 2 * C + 1
    _, _, A, D = folded_shape(B, C, H, W, axis, p)
    inputs = [randn(B, cin, A, D), weight(C * p, cin, form)] + ([randn(C * p, scale=0.1)] if bias else [])
    check_against_oracle(*linear_unfold_fns(axis, p, L, shift), [t.to(device) for t in inputs], dtype)


# ---- memory formats and views ---------------------------------------------------------------


def keeps_channels_last(fn):
    def wrapped(*a):
        out = fn(*a)
        assert out.is_contiguous(memory_format=CL), f"output strides {out.stride()} are not channels_last"
        return out
    return wrapped


# (op, fused, oracle, input shapes): every op on a channels_last input whose output has no size-1
# spatial dimension (so its memory format is unambiguous).
def format_cases():
    sl, sl_ref = shift_linear_fns([(-1, 0), (0, 2), (3, -1)], [4, 4, 2], "zeros")
    st, st_ref = shift_fns([(-1, 0), (0, 2), (3, -1)], [4, 4, 2], "circular")
    return [
        ("shift_tokens", st, st_ref, [(2, 10, 6, 7)]),
        ("shift_linear", sl, sl_ref, [(2, 10, 6, 7), (12, 10), (12,)]),
        ("region_fold", *fold_fns(2, 3, 1), [(2, 4, 14, 5)]),
        ("region_fold_w", *fold_fns(3, 2, -1), [(2, 4, 5, 7)]),
        ("region_unfold", *unfold_fns(2, 3, 14, 1), [(2, 12, 5, 6)]),
        ("region_unfold_w", *unfold_fns(3, 2, 7, -1), [(2, 8, 5, 4)]),
        ("region_fold_linear", *fold_linear_fns(3, 3, 2), [(2, 4, 5, 14), (9, 12), (9,)]),
        ("linear_region_unfold", *linear_unfold_fns(2, 2, 7, 1), [(2, 9, 4, 6), (8, 9, 1, 1), (8,)]),
    ]


FORMAT_CASES = format_cases()


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_channels_last_kept(device, dtype, case):
    _, fused, oracle, shapes = case
    inputs = [randn(*s) for s in shapes]
    inputs[0] = inputs[0].to(memory_format=CL)
    check_against_oracle(keeps_channels_last(fused), oracle, [t.to(device) for t in inputs], dtype)


def channel_slice(fn):
    """fn of x[:, 1:-1]: the channel slice taken inside, so the op sees a strided view."""
    return lambda x, *rest: fn(x[:, 1:-1], *rest)


def spatial_transpose(fn):
    """fn of x.transpose(2, 3): a view with swapped spatial strides."""
    return lambda x, *rest: fn(x.transpose(2, 3), *rest)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", [channel_slice, spatial_transpose], ids=["channel-slice", "transposed"])
@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_strided_views(device, view, case):
    _, fused, oracle, shapes = case
    B, C, H, W = shapes[0]
    base = randn(B, C + 2, H, W) if view is channel_slice else randn(B, C, W, H)
    inputs = [base] + [randn(*s) for s in shapes[1:]]
    check_against_oracle(view(fused), view(oracle), [t.to(device) for t in inputs], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_weight(device):
    # A weight that is a transposed view ([C, Cout] storage) and a bias that is a strided slice.
    sl, sl_ref = shift_linear_fns([(1, -1), (0, 2)], None, "zeros")
    fl, fl_ref = fold_linear_fns(2, 2, 1)
    ul, ul_ref = linear_unfold_fns(3, 3, 8, -1)

    def views(fn):
        return lambda x, wt, b2: fn(x, wt.t(), b2[::2])
    for fused, oracle, shapes in [(sl, sl_ref, [(2, 6, 5, 7), (6, 9), (18,)]),
                                  (fl, fl_ref, [(2, 4, 7, 5), (8, 7), (14,)]),
                                  (ul, ul_ref, [(2, 5, 6, 3), (5, 9), (18,)])]:
        check_against_oracle(views(fused), views(oracle), [randn(*s).to(device) for s in shapes], torch.float32)


# ---- kernel paths: many tiles, thread counts, empty batch ---------------------------------

# Shapes past one tile per image: the CPU kernels tile about 96K floats / max(K, Cout) pixels, so
# 160 channels over a 21x23 grid make tiles of 16 rows, which straddle images. With 40 images (34
# tiles) the weight gradient sums more tiles than its 32 chunks, some chunks holding two.
def multi_tile_cases(B):
    C, J = 160, 48
    pairs = [(1, -2), (-3, 0), (0, 25), (-22, 5)]
    cases = []
    for mode in MODES:
        f, o = shift_linear_fns(pairs, None, mode)
        cases.append((f"shift_linear-{mode}", f, o, [(B, C, 21, 23), (J, C), (J,)]))
    # The folded grids: 15x23 (45 rows, p = 3) and 21x24 (47 columns, p = 2), tiles across images.
    for axis, p, shift, H, W in [(2, 3, 1, 45, 23), (3, 2, -4, 21, 47)]:
        f, o = fold_linear_fns(axis, p, shift)
        cases.append((f"region_fold_linear-axis{axis}", f, o, [(B, C // p, H, W), (J, (C // p) * p), (J,)]))
        f, o = linear_unfold_fns(axis, p, H if axis == 2 else W, shift)
        cases.append((f"linear_region_unfold-axis{axis}", f, o,
                      [(B, C, *folded_shape(B, J // p, H, W, axis, p)[2:]), ((J // p) * p, C), ((J // p) * p,)]))
    return cases


MULTI_TILE = multi_tile_cases(3)
MANY_TILES = multi_tile_cases(40)


def check_tiles(device, dtype, case):
    _, fused, oracle, shapes = case
    inputs = [randn(*shapes[0]), randn(*shapes[1], scale=shapes[1][1] ** -0.5), randn(*shapes[2], scale=0.1)]
    check_against_oracle(fused, oracle, [t.to(device) for t in inputs], dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", MULTI_TILE, ids=[c[0] for c in MULTI_TILE])
def test_multi_tile(device, dtype, case):
    check_tiles(device, dtype, case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [MANY_TILES[0], MANY_TILES[3]], ids=[MANY_TILES[0][0], MANY_TILES[3][0]])
def test_more_tiles_than_chunks(device, case):
    check_tiles(device, torch.float32, case)


@pytest.mark.parametrize("case", MANY_TILES[1:4], ids=[c[0] for c in MANY_TILES[1:4]])
def test_deterministic_threads(case):
    # Forward and every gradient bit for bit the same on 1 and 2 threads.
    _, fused, _, shapes = case
    ins = [torch.randn(*s, generator=GEN).requires_grad_() for s in shapes]
    runs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = fused(*ins)
            runs.append((out.detach(),) + torch.autograd.grad(out.square().sum(), ins))
        finally:
            torch.set_num_threads(prev)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_empty_batch(device, case):
    _, fused, oracle, shapes = case
    ins = [torch.randn(0, *shapes[0][1:], device=device)] + [torch.randn(*s, device=device) for s in shapes[1:]]
    ins = [t.requires_grad_() for t in ins]
    out = fused(*ins)
    assert out.shape == oracle(*ins).shape
    grads = torch.autograd.grad(out.sum(), ins, allow_unused=True)
    assert all(g is not None and g.shape == t.shape and not g.any() for g, t in zip(grads, ins))


@pytest.mark.parametrize("device", DEVICES)
def test_no_pixel_or_no_output_channel(device):
    # A map with no pixel, or a weight with no output channel: the outputs are empty and every
    # gradient is zero (the kernels overwrite uninitialised gradient buffers).
    def run(op, x, w, b):
        ins = [t.to(device).requires_grad_() for t in (x, w, b)]
        out = op(*ins)
        grads = torch.autograd.grad(out.sum(), ins, allow_unused=True)
        assert all(g is not None and g.shape == t.shape and not g.any() for g, t in zip(grads, ins))
        return out

    shift = lambda x, w, b: tm.shift_linear(x, [(1, -1)], w, b)  # noqa: E731
    fold = lambda x, w, b: tm.region_fold_linear(x, 2, 3, w, b, 1)  # noqa: E731
    unfold = lambda y, w, b: tm.linear_region_unfold(y, 3, 2, 5, w, b, 1)  # noqa: E731
    assert run(shift, torch.randn(2, 4, 0, 6), torch.randn(3, 4), torch.randn(3)).shape == (2, 3, 0, 6)
    assert run(shift, torch.randn(2, 4, 5, 6), torch.randn(0, 4), torch.randn(0)).shape == (2, 0, 5, 6)
    assert run(fold, torch.randn(2, 4, 7, 0), torch.randn(5, 12), torch.randn(5)).shape == (2, 5, 3, 0)
    assert run(fold, torch.randn(2, 4, 7, 5), torch.randn(0, 12), torch.randn(0)).shape == (2, 0, 3, 5)
    assert run(unfold, torch.randn(2, 3, 0, 3), torch.randn(8, 3), torch.randn(8)).shape == (2, 4, 0, 5)


# ---- gradcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_shift(device, mode):
    st, _ = shift_fns([(-1, 0), (0, 0), (4, -2)], [2, 2, 1], mode)
    check_gradcheck(st, [randn(2, 5, 3, 4).to(device)])
    sl, _ = shift_linear_fns([(1, -1), (-1, 2), (0, 5)], None, mode)
    check_gradcheck(sl, [t.to(device) for t in [randn(1, 3, 4, 3), randn(4, 3), randn(4)]])
    check_gradcheck(sl, [t.to(device) for t in [randn(2, 3, 3, 2), randn(2, 3, 1, 1)]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis,p,L,shift", [(2, 2, 5, 1), (3, 3, 4, -5), (2, 5, 5, 2), (3, 1, 3, 0)])
def test_gradcheck_region(device, axis, p, L, shift):
    B, C = 2, 2
    H, W = (L, 3) if axis == 2 else (3, L)
    _, _, A, D = folded_shape(B, C, H, W, axis, p)
    dev = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    check_gradcheck(fold_fns(axis, p, shift)[0], dev([randn(B, C, H, W)]))
    check_gradcheck(unfold_fns(axis, p, L, shift)[0], dev([randn(B, C * p, A, D)]))
    check_gradcheck(fold_linear_fns(axis, p, shift)[0], dev([randn(B, C, H, W), randn(3, C * p), randn(3)]))
    check_gradcheck(linear_unfold_fns(axis, p, L, shift)[0], dev([randn(B, 3, A, D), randn(C * p, 3, 1, 1)]))


# ---- bad input ------------------------------------------------------------------------------


def bad_cases():
    x = torch.randn(2, 10, 6, 7)
    x8 = torch.randn(2, 8, 6, 7)
    pairs3 = [(-1, 0), (0, 0), (1, 0)]
    w, b = torch.randn(5, 10), torch.randn(5)
    y = torch.randn(2, 12, 2, 7)          # region_fold(x[:, :4], axis 2, p 3) of 6 rows: [2, 12, 2, 7]
    wf, bf = torch.randn(5, 12), torch.randn(5)
    wu = torch.randn(12, 3)               # projects 3 channels to C * p = 4 * 3
    yu = torch.randn(2, 3, 2, 7)
    V, T = ValueError, TypeError
    # (id, exception type, the message without its "tokenmix.<op>: " prefix, op, arguments)
    return [
        ("shifts-vs-groups", V, "groups must give one channel count per shift pair (3), got 2",
         tm.shift_tokens, (x8, pairs3, [4, 4])),
        ("shifts-empty", V, "shifts must hold G >= 1 (dy, dx) pairs, got 0 numbers", tm.shift_tokens, (x8, [], None)),
        ("groups-sum", V, "groups must sum to x.size(1) = 10, got 9", tm.shift_tokens, (x, pairs3, [4, 4, 1])),
        ("groups-negative", V, "groups must be channel counts >= 0, got -2", tm.shift_tokens, (x, pairs3, [6, 6, -2])),
        ("groups-divisible", V,
         "x.size(1) = 10 must be divisible by the number of shift pairs G = 3 when groups is None",
         tm.shift_tokens, (x, pairs3, None)),
        ("mode", V, 'mode must be "zeros" or "circular", got "reflect"', tm.shift_tokens,
         (x, pairs3, [4, 4, 2], "reflect")),
        ("shift-x-rank", V, "x must have 4 dimensions [B, C, H, W], got 3 (shape [10, 6, 7])", tm.shift_tokens,
         (x[0], pairs3, [4, 4, 2])),
        ("linear-groups-divisible", V, "x.size(1) = 10 must be divisible by the number of shift pairs G = 3",
         tm.shift_linear, (x, pairs3, w, b)),
        ("linear-mode", V, 'mode must be "zeros" or "circular", got "wrap"', tm.shift_linear,
         (x, pairs3, w, b, [4, 4, 2], "wrap")),
        ("linear-weight-k", V, "weight.size(1) must equal x.size(1) = 10, got 9 (shape [5, 9])", tm.shift_linear,
         (x, pairs3, w[:, :9], b, [4, 4, 2])),
        ("linear-weight-4d-k", V, "weight must be [C_out, x.size(1)] or [C_out, x.size(1), 1, 1], got [5, 10, 3, 3]",
         tm.shift_linear, (x, pairs3, torch.randn(5, 10, 3, 3), b, [4, 4, 2])),
        ("linear-bias-size", V, "bias.size(0) must equal weight.size(0) = 5, got 4 (shape [4])", tm.shift_linear,
         (x, pairs3, w, b[:4], [4, 4, 2])),
        ("linear-weight-dtype", T, "weight must have the dtype of x (Float), got Double", tm.shift_linear,
         (x, pairs3, w.double(), b, [4, 4, 2])),
        ("linear-bias-dtype", T, "bias must have the dtype of x (Float), got Double", tm.shift_linear,
         (x, pairs3, w, b.double(), [4, 4, 2])),
        ("linear-x-rank", V, "x must have 4 dimensions [B, C, H, W], got 3", tm.shift_linear,
         (x[0], pairs3, w, b, [4, 4, 2])),
        ("fold-region-too-large", V, "region must lie in [1, H = 6], got 7", tm.region_fold, (x, 2, 7)),
        ("fold-region-zero", V, "region must lie in [1, W = 7], got 0", tm.region_fold, (x, 3, 0)),
        ("fold-region-negative", V, "region must lie in [1, H = 6], got -2", tm.region_fold, (x, 2, -2)),
        ("fold-axis", V, "axis must be 2 (rows) or 3 (columns), got 1", tm.region_fold, (x, 1, 2)),
        ("fold-axis-negative", V, "axis must be 2 (rows) or 3 (columns), got -1", tm.region_fold, (x, -1, 2)),
        ("fold-x-rank", V, "x must have 4 dimensions [B, C, H, W], got 3", tm.region_fold, (x[0], 2, 2)),
        ("unfold-size-small", V, "size must lie in [4, 6] (at least region = 3, and ceil(size / region) equal to the 2 regions "
         "along axis 2), got 3",
         tm.region_unfold, (y, 2, 3, 3)),
        ("unfold-size-large", V, "size must lie in [4, 6] (at least region = 3, and ceil(size / region) equal to the 2 regions "
         "along axis 2), got 7",
         tm.region_unfold, (y, 2, 3, 7)),
        ("unfold-channels", V, "y.size(1) = 11 must be divisible by region = 3", tm.region_unfold,
         (y[:, :11], 2, 3, 6)),
        ("unfold-region-zero", V, "region must be >= 1, got 0", tm.region_unfold, (y, 2, 0, 6)),
        ("unfold-axis", V, "axis must be 2 (rows) or 3 (columns), got 4", tm.region_unfold, (y, 4, 3, 6)),
        ("unfold-y-rank", V, "y must have 4 dimensions [B, C, H, W], got 3", tm.region_unfold, (y[0], 2, 3, 6)),
        ("fold-linear-weight-k", V, "weight.size(1) must equal x.size(1) * region = 12, got 11 (shape [5, 11])",
         tm.region_fold_linear, (x[:, :4], 2, 3, wf[:, :11], bf)),
        ("fold-linear-bias-size", V, "bias.size(0) must equal weight.size(0) = 5, got 3", tm.region_fold_linear,
         (x[:, :4], 2, 3, wf, bf[:3])),
        ("fold-linear-weight-dtype", T, "weight must have the dtype of x (Float), got Double", tm.region_fold_linear,
         (x[:, :4], 2, 3, wf.double(), bf)),
        ("fold-linear-region", V, "region must lie in [1, W = 7], got 8", tm.region_fold_linear,
         (x[:, :4], 3, 8, torch.randn(5, 32), bf)),
        ("fold-linear-axis", V, "axis must be 2 (rows) or 3 (columns), got 0", tm.region_fold_linear,
         (x[:, :4], 0, 3, wf, bf)),
        ("unfold-linear-weight-k", V, "weight.size(1) must equal y.size(1) = 3, got 2 (shape [12, 2])",
         tm.linear_region_unfold, (yu, 2, 3, 6, wu[:, :2])),
        ("unfold-linear-weight-rows", V, "weight.size(0) = 11 must be divisible by region = 3",
         tm.linear_region_unfold, (yu, 2, 3, 6, wu[:11])),
        ("unfold-linear-bias-size", V, "bias.size(0) must equal weight.size(0) = 12, got 11", tm.linear_region_unfold,
         (yu, 2, 3, 6, wu, torch.randn(11))),
        ("unfold-linear-weight-dtype", T, "weight must have the dtype of y (Float), got Double",
         tm.linear_region_unfold, (yu, 2, 3, 6, wu.double())),
        ("unfold-linear-size", V, "size must lie in [4, 6] (at least region = 3, and ceil(size / region) equal to the 2 regions "
         "along axis 2), got 9",
         tm.linear_region_unfold, (yu, 2, 3, 9, wu)),
        ("unfold-linear-axis", V, "axis must be 2 (rows) or 3 (columns), got 5", tm.linear_region_unfold,
         (yu, 5, 3, 6, wu)),
    ]


BAD = bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, exc, msg, fn, args = case
    op = fn.__name__
    pattern = (re.escape(msg) if isinstance(msg, str) else "[xy]".join(re.escape(m) for m in msg))
    check_raises(exc, rf"^tokenmix\.{op}: {pattern}", fn, *args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_device_cpu_vs_cuda():
    x = torch.randn(1, 4, 5, 5, device="cuda")
    check_raises(ValueError, r"weight must be on the device of", tm.shift_linear, x, [(1, 0)], torch.randn(3, 4))
    check_raises(ValueError, r"weight must be on the device of", tm.region_fold_linear, x, 2, 2,
                 torch.randn(3, 8))
    check_raises(ValueError, r"weight must be on the device of", tm.linear_region_unfold,
                 torch.randn(1, 4, 3, 5, device="cuda"), 2, 2, 5, torch.randn(6, 4))
