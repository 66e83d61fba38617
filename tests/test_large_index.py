"""Indexing past 2^31 elements (issue 19, point 3): for every op family, a real CPU run in which the
tensors the kernels index hold more than 2^31 elements, checked at positions past 2^31 against the
eager oracle (tokenmix.reference) run on a small slice; and meta / fake-tensor runs whose shapes
pass 2^32 elements, through the fake kernels and (fake) autograd.

Every family has sizes whose product passes 2^31 (batch x tokens x channels, maps, attention
rows), so every family has a test here.

How the real runs stay within memory and time on a small machine:
- bf16 (the CPU kernels' 2-byte dtype) wherever the op's CPU path keeps it end to end; gnconv runs
  in fp32 because its CPU kernels convert x to fp32 as a whole (a bf16 x would cost a full fp32
  copy on top).
- Large inputs are allocated with torch.empty and only the slices the checks read are written. The
  kernels still read the whole tensor, but Linux backs a page of such an allocation only once it
  is written, so the resident memory of a test is what the kernels write (the outputs) plus those
  slices. The checks never depend on the contents of the unwritten part: they compare slices whose
  results depend only on written inputs (a batch row, an image, a window), or choose the other
  inputs so that nothing is read from it (deform_conv2d's offsets send every other image's samples
  outside the map, and its output gradient is zero there).
- Where a backward's peak would pass ~12 GiB through autograd (saved outputs beside full-size
  gradients), the backward op is called directly after the forward's output is freed; it is the
  kernel autograd calls.
- Each test skips, naming the memory it needs, when /proc/meminfo's MemAvailable is below that.

Backward passes not run at this size: gnconv's, for memory (its CPU backward keeps proj_in's
output and the gradients of it and of the gates at full size in fp32, over 20 bytes per element of
x: more than 40 GiB for a 2^31-element x); and, for time, those that only repeat kernels run here
at this size: scatter_tokens' (the row composition of gather_tokens' backward and scatter_tokens'
forward, and gather_tokens' row copy), shift_tokens' (shift_tokens with the shift negated) and
region_fold_linear's (see its test).
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tokenmix.ops as tm
from tokenmix.ops.gnconv import gate_dims
from tokenmix.reference import deform_conv2d as ref_deform
from tokenmix.reference import gather as ref_gather
from tokenmix.reference import gnconv as ref_gnconv
from tokenmix.reference import shift as ref_shift
from tokenmix.reference import window_attention as ref_window
from tokenmix.testing import assert_close_to_exact

GiB = 1 << 30
P31 = 1 << 31
BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
OPS = torch.ops.tokenmix


# ---- helpers ----------------------------------------------------------------------------------


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def need(gib: float) -> None:
    """Skip unless MemAvailable is at least `gib` GiB (what the test writes, plus a margin)."""
    avail = _mem_available()
    if avail < gib * GiB:
        pytest.skip(f"needs {gib:g} GiB of memory, /proc/meminfo's MemAvailable is {avail / GiB:.1f} GiB")


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=BF16, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)


def check(actual, eager, exact, what):
    """The suite's accuracy rule (tokenmix.testing): bf16 result vs the fp64 oracle, bounded by
    what the bf16 eager oracle loses."""
    assert_close_to_exact(actual, eager, exact, BF16, what)


def oracle(fn, inputs, grad_out=None, grad_of=()):
    """fn on inputs in fp64 (exact) and in their own dtype (eager): outputs, and with grad_out the
    gradients of the inputs indexed by grad_of. Returns ((exact_out, eager_out), [(exact_g,
    eager_g), ...])."""
    runs = []
    for dtype in (F64, None):
        ins = [t.detach().to(dtype or t.dtype).requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
        out = fn(*ins)
        grads = []
        if grad_out is not None:
            grads = torch.autograd.grad(out, [ins[i] for i in grad_of], grad_out.to(out.dtype))
        runs.append((out.detach(), [g.detach() for g in grads]))
    (x_out, x_grads), (e_out, e_grads) = runs
    return (x_out, e_out), list(zip(x_grads, e_grads))


def exactly(actual, expected, what):
    assert torch.equal(actual, expected), f"{what}: differs from the expected copy"


def zero(t, what):
    assert int(torch.count_nonzero(t)) == 0, f"{what}: expected zeros"


# ---- sparse-token gather (DynamicViT) -----------------------------------------------------------

# [B, N, C] tokens of 2^31 + 2048 elements: batch row 1 ends past 2^31 (its token N - 2 starts at
# element 2^31 exactly).
GB, GN, GC = 2, (1 << 20) + 1, 1024


def test_gather_tokens_past_2_31():
    """gather_tokens forward and backward (duplicates summed) on rows past 2^31."""
    need(5)  # the [B, N, C] bf16 gradient
    g = gen(1)
    x = torch.empty(GB, GN, GC, dtype=BF16)
    index = torch.tensor([[0, 5, GN - 1, 7, 7, 3],
                          [GN - 1, GN - 2, 0, GN - 1, 12345, GN // 2]])
    for b in range(GB):
        for n in index[b].unique().tolist():
            x[b, n] = randn(GC, g=g)
    assert (GB * GN - 1) * GC >= P31 and ((GB - 1) * GN + GN - 2) * GC == P31
    x.requires_grad_(True)
    out = tm.gather_tokens(x, index)
    expected = torch.stack([x.detach()[b, index[b]] for b in range(GB)])
    exactly(out, expected, "gather_tokens")

    grad = randn(GB, index.shape[1], GC, g=g)
    (gx,) = torch.autograd.grad(out, x, grad)
    x = None
    summed = (grad[1, 0].float() + grad[1, 3].float()).to(BF16)  # k order, fp32
    exactly(gx[1, GN - 1], summed, "gather_tokens backward, duplicated row past 2^31")
    exactly(gx[1, GN - 2], grad[1, 1], "gather_tokens backward, row at 2^31")
    exactly(gx[1, GN // 2], grad[1, 5], "gather_tokens backward")
    exactly(gx[0, 7], (grad[0, 3].float() + grad[0, 4].float()).to(BF16), "gather_tokens backward, batch 0")
    zero(gx[1, GN - 64:GN - 2], "gather_tokens backward, rows past 2^31 not gathered")


def test_scatter_tokens_past_2_31():
    """scatter_tokens forward: replaced rows past 2^31 hold src, the others x."""
    need(5)  # the [B, N, C] bf16 output
    g = gen(2)
    x = torch.empty(GB, GN, GC, dtype=BF16)
    index = torch.tensor([[3, GN - 1, 9], [GN - 1, GN - 2, 4]])
    keep = [(1, GN - 3), (1, GN - 4), (0, GN - 2)]
    for b, n in keep + [(b, n) for b in range(GB) for n in index[b].tolist()]:
        x[b, n] = randn(GC, g=g)
    src = randn(GB, index.shape[1], GC, g=g)
    out = tm.scatter_tokens(x, index, src)
    for b in range(GB):
        exactly(out[b, index[b]], src[b], f"scatter_tokens, replaced rows of batch {b}")
    for b, n in keep:
        exactly(out[b, n], x[b, n], f"scatter_tokens, kept row ({b}, {n})")


def test_topk_tokens_past_2_31():
    """topk_tokens: the best-scored tokens of batch row 1 lie past 2^31."""
    need(1)
    g = gen(3)
    x = torch.empty(GB, GN, GC, dtype=BF16)
    keep_first, k = 1, 4
    score = torch.rand(GB, GN - keep_first, generator=g)
    best = torch.tensor([[10, 200, GN - 2, 5], [GN - 2, GN - 3, 17, GN // 2]])  # positions in score
    for b in range(GB):
        score[b, best[b]] = torch.tensor([4.0, 3.0, 2.0, 1.5])
        for n in [0] + (best[b] + keep_first).tolist():
            x[b, n] = randn(GC, g=g)
    tokens, index = tm.topk_tokens(x, score, k, keep_first=keep_first)
    expected_index = torch.cat([torch.zeros(GB, 1, dtype=torch.long), best + keep_first], 1)
    exactly(index, expected_index, "topk_tokens index")
    exactly(tokens, torch.stack([x[b, expected_index[b]] for b in range(GB)]), "topk_tokens tokens")


def test_policy_softmax_past_2_31():
    """policy_softmax forward and backward on the last batch row, which starts at element 2^31."""
    need(5.5)  # output, then gradient, each a 4 GiB bf16 [B, h, N, N], and the policy partials
    B, h, N = 257, 2, 2048
    assert (B - 1) * h * N * N == P31
    g = gen(4)
    logits = torch.empty(B, h, N, N, dtype=BF16)
    logits[-1] = randn(h, N, N, g=g, scale=3.0)
    policy = (torch.rand(B, N, generator=g) > 0.3).to(BF16)
    policy[-1, :N // 2] = torch.rand(N // 2, generator=g).to(BF16)  # fractional values too
    out = tm.policy_softmax(logits, policy)
    grad = torch.empty_like(logits)
    grad[-1] = randn(h, N, N, g=g)
    (x_out, e_out), grads = oracle(ref_gather.policy_softmax, [logits[-1:], policy[-1:]], grad[-1:], (0, 1))
    check(out[-1:], e_out, x_out, "policy_softmax past 2^31")
    out = None
    gl, gp = OPS.policy_softmax_backward(grad, logits, policy, 1e-6)
    check(gl[-1:], grads[0][1], grads[0][0], "policy_softmax grad_logits past 2^31")
    check(gp[-1:], grads[1][1], grads[1][0], "policy_softmax grad_policy past 2^31")


# ---- windowed attention (Swin, GC ViT) ------------------------------------------------------------

# [B, H, W, heads, d] maps of 2^31 + 2^19 elements: the last image starts at element 2^31.
WB, WH, WW, WHEADS, WD = 4097, 64, 64, 4, 32


def test_window_attention_past_2_31():
    """Shifted windows with a relative position bias: the last image, past 2^31, vs the oracle."""
    need(5)  # the bf16 output
    assert (WB - 1) * WH * WW * WHEADS * WD == P31
    g = gen(5)
    x = torch.empty(WB, WH, WW, WHEADS, WD, dtype=BF16)  # q = k = v
    x[-1] = randn(WH, WW, WHEADS, WD, g=g)
    window, shift = (4, 4), (2, 2)
    bias = randn(7 * 7, WHEADS, g=g)
    out = tm.window_attention(x, x, x, window, shift, bias)
    (x_out, e_out), _ = oracle(lambda q, b: ref_window.window_attention(q, q, q, window, shift, b),
                               [x[-1:], bias])
    check(out[-1:], e_out, x_out, "window_attention past 2^31")


def test_window_attention_backward_past_2_31():
    """Backward with a global query (GC ViT): dk, dv of the last image past 2^31, and its dq (a sum
    over the image's windows)."""
    need(9)  # dk and dv, bf16, and the log-sum-exp
    g = gen(6)
    window = (4, 4)
    k = torch.empty(WB, WH, WW, WHEADS, WD, dtype=BF16)  # k = v
    k[-1] = randn(WH, WW, WHEADS, WD, g=g)
    q = randn(WB, *window, WHEADS, WD, g=g)
    grad = torch.empty_like(k)
    grad[-1] = randn(WH, WW, WHEADS, WD, g=g)
    # The backward recomputes P from the forward's row log-sum-exp; the last image's comes from the
    # forward run on that image alone (the other images' are never compared).
    lse = torch.empty(WB, (WH // window[0]) * (WW // window[1]), window[0] * window[1], WHEADS, dtype=F32)
    lse[-1:] = OPS.window_attention_fwd(q[-1:], k[-1:], k[-1:], window, (0, 0), None, None)[1]
    dq, dk, dv, _ = OPS.window_attention_backward(grad, q, k, k, lse, window, (0, 0), None, None)
    _, grads = oracle(lambda q_, k_, v_: ref_window.window_attention(q_, k_, v_, window),
                      [q[-1:], k[-1:], k[-1:]], grad[-1:], (0, 1, 2))
    for name, got, (exact, eager) in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        check(got[-1:], eager, exact, f"window_attention {name} past 2^31")


# ---- deformable convolution (LIT) ---------------------------------------------------------------

# input [32, 1, 8193, 8193]: 2^31 + 524,320 elements; image 31's rows >= 8130 lie past 2^31.
DB, DH = 32, 8193
CROP = 16  # the oracle runs on the bottom-right CROP x CROP corner of image 31


def deform_case(g):
    """Offsets that send image 31's taps to the bottom-right corner (some across the border, one
    outside the map) and every other image's far outside it (those read nothing); DCNv2 mask."""
    kh = kw = 3
    offset = torch.full((DB, 2 * kh * kw, 1, 1), -100.0, dtype=F64)
    corner = DH - 1 - 0.3 * torch.rand(kh * kw, 2, generator=g, dtype=F64) * 10  # y, x in [H - 4, H - 1]
    corner[0] = torch.tensor([DH - 0.5, DH - 2.25])       # across the bottom border
    corner[1] = torch.tensor([DH - 3.75, DH - 0.25])      # across the right border
    corner[2] = torch.tensor([DH + 0.5, DH - 5.5])        # outside the map: reads zero
    base = torch.tensor([[ky, kx] for ky in range(kh) for kx in range(kw)], dtype=F64)
    offset[-1, :, 0, 0] = (corner - base).reshape(-1)
    offset = offset.to(BF16)
    mask = torch.rand(DB, kh * kw, 1, 1, generator=g).to(BF16)
    weight = randn(4, 1, kh, kw, g=g)
    bias = randn(4, g=g)
    return offset, weight, bias, mask


def test_deform_conv2d_past_2_31():
    """Forward and backward: samples in image 31 past 2^31, vs the oracle on that image's corner."""
    need(5.5)  # grad_input (bf16) and two threads' fp32 image-sized scratch
    g = gen(7)
    x = torch.empty(DB, 1, DH, DH, dtype=BF16)
    assert x.numel() > P31 and (DB - 1) * DH * DH + (DH - CROP) * DH > P31
    x[-1, :, -CROP:, -CROP:] = randn(1, CROP, CROP, g=g)
    offset, weight, bias, mask = deform_case(g)
    stride = DH  # one output pixel per image
    leaves = [x, offset, weight, bias, mask]
    for t in leaves:
        t.requires_grad_(True)
    out = tm.deform_conv2d(x, offset, weight, bias, stride=stride, mask=mask)

    # The same sample positions relative to the corner crop (its top-left at H - CROP).
    crop_offset = offset[-1:].detach().double().reshape(1, 9, 2, 1, 1) - (DH - CROP)
    crop_offset = crop_offset.reshape(1, 18, 1, 1).to(BF16)
    inputs = [x[-1:, :, -CROP:, -CROP:], crop_offset, weight, bias, mask[-1:]]
    grad = torch.zeros(DB, 4, 1, 1, dtype=BF16)
    grad[-1] = randn(4, 1, 1, g=g)

    def fn(xc, off, w, b, m):
        return ref_deform.deform_conv2d(xc, off, w, b, stride=CROP, mask=m)

    (x_out, e_out), grads = oracle(fn, inputs, grad[-1:], (0, 1, 2, 3, 4))
    check(out[-1:], e_out, x_out, "deform_conv2d past 2^31")
    gi, goff, gw, gb, gm = torch.autograd.grad(out, leaves, grad)
    out = x = None
    check(gi[-1:, :, -CROP:, -CROP:], grads[0][1], grads[0][0], "deform_conv2d grad_input past 2^31")
    zero(gi[-1, 0, :-CROP, :], "deform_conv2d grad_input outside the sampled corner")
    check(goff[-1:], grads[1][1], grads[1][0], "deform_conv2d grad_offset")
    check(gw, grads[2][1], grads[2][0], "deform_conv2d grad_weight")
    check(gb, grads[3][1], grads[3][0], "deform_conv2d grad_bias")
    check(gm[-1:], grads[4][1], grads[4][0], "deform_conv2d grad_mask")


# ---- recursive gated convolution (HorNet) --------------------------------------------------------

def test_gnconv_past_2_31():
    """Forward in fp32 (see the module docstring) with x of 2^31 + 2^13 elements: the last image,
    which starts at element 2^31, vs the oracle."""
    need(9)  # the fp32 output
    dim, order, k, H, W = 8, 2, 3, 32, 32
    B = P31 // (dim * H * W) + 1
    g = gen(8)
    dims = gate_dims(dim, order)
    S = sum(dims)

    def w(*shape, fan_in):
        return randn(*shape, g=g, dtype=F32, scale=fan_in ** -0.5)

    params = [w(2 * dim, dim, 1, 1, fan_in=dim), w(2 * dim, fan_in=1),
              w(S, 1, k, k, fan_in=k * k), w(S, fan_in=1),
              [w(dims[i + 1], dims[i], 1, 1, fan_in=dims[i]) for i in range(order - 1)],
              [w(dims[i + 1], fan_in=1) for i in range(order - 1)],
              w(dim, dim, 1, 1, fan_in=dim), w(dim, fan_in=1)]
    x = torch.empty(B, dim, H, W, dtype=F32)
    x[-1] = randn(dim, H, W, g=g, dtype=F32)
    out = tm.gnconv(x, *params, order=order, scale=1 / 3)

    def fn(x_, *p):
        n = order - 1
        return ref_gnconv.gnconv(x_, *p[:4], list(p[4:4 + n]), list(p[4 + n:4 + 2 * n]), *p[4 + 2 * n:],
                                 order=order, scale=1 / 3)

    flat = [t for p in params for t in (p if isinstance(p, list) else [p])]
    exact, eager = fn(x[-1:].double(), *[t.double() for t in flat]), fn(x[-1:], *flat)
    assert_close_to_exact(out[-1:], eager, exact, F32, "gnconv past 2^31")


# ---- shifted / rearranged token mixing (AS-MLP, CycleMLP, Hire-MLP) ------------------------------

def test_shift_tokens_past_2_31():
    """A row of 2^31 + 1 tokens shifted by 2^31, zeros and circular: the shift, normalised to the
    row, needs more than 32 bits (the per-channel shift table the kernels read is int64 for it).
    The backward is this op with the shift negated."""
    need(5)  # the bf16 output
    n = P31 + 1
    g = gen(9)
    x = torch.empty(1, 1, 1, n, dtype=BF16)
    x[..., :64] = randn(64, g=g)
    x[..., -64:] = randn(64, g=g)
    out = tm.shift_tokens(x, [(0, P31)], mode="zeros")  # out[w] = x[w - 2^31]
    exactly(out[..., P31:], x[..., :1], "shift_tokens zeros, the element shifted past 2^31")
    zero(out[..., :64], "shift_tokens zeros, the start")
    zero(out[..., P31 - 64:P31], "shift_tokens zeros, before 2^31")
    out = None
    out = tm.shift_tokens(x, [(0, P31)], mode="circular")  # out[w] = x[(w - 2^31) mod n]
    exactly(out[..., P31:], x[..., :1], "shift_tokens circular, past 2^31")
    exactly(out[..., :63], x[..., 1:64], "shift_tokens circular, the start")
    exactly(out[..., P31 - 63:P31], x[..., -63:], "shift_tokens circular, before 2^31")


# [B, C, H, W] maps of 2^31 + 2^16 elements: the last image starts at element 2^31.
SB, SC, SH, SW = 32769, 16, 64, 64


def test_shift_linear_past_2_31():
    """Four channel groups shifted (zeros) into a 1x1 projection, forward and backward, on the last
    image past 2^31."""
    need(6)  # grad_x (bf16), the output and its gradient
    assert (SB - 1) * SC * SH * SW == P31
    g = gen(10)
    shifts, groups = [(1, 0), (0, -1), (-2, 3), (0, 0)], [4, 4, 4, 4]
    x = torch.empty(SB, SC, SH, SW, dtype=BF16)
    x[-1] = randn(SC, SH, SW, g=g)
    weight, bias = randn(2, SC, g=g, scale=0.25), randn(2, g=g)
    x.requires_grad_(True)
    out = tm.shift_linear(x, shifts, weight, bias, groups)
    grad = torch.zeros_like(out)
    grad[-1] = randn(2, SH, SW, g=g)

    def fn(x_, w_, b_):
        return ref_shift.shift_linear(x_, [v for p in shifts for v in p], w_, b_, groups)

    (x_out, e_out), grads = oracle(fn, [x[-1:], weight, bias], grad[-1:], (0,))
    check(out[-1:], e_out, x_out, "shift_linear past 2^31")
    (gx,) = torch.autograd.grad(out, x, grad)
    check(gx[-1:], grads[0][1], grads[0][0], "shift_linear grad_x past 2^31")


# Rows folded by 4 (62 rows: 2 rows of circular padding) with a cyclic shift; x has 2^31 + 442,368
# elements, the fold 2^31 + 70,254,592 (its last image starts past 2^31).
FB, FC, FH, FW, FP, FS = 4229, 2, 62, 4096, 4, 5


def test_region_fold_past_2_31():
    """region_fold along rows and its backward (the unfold kernel, the padded copies' gradients
    added): the last image vs the oracle."""
    need(9)  # the fold and its backward, bf16
    folded_image = FC * FP * ((FH + FP - 1) // FP) * FW
    assert FB * FC * FH * FW > P31 and (FB - 1) * folded_image > P31
    g = gen(11)
    x = torch.empty(FB, FC, FH, FW, dtype=BF16)
    x[-1] = randn(FC, FH, FW, g=g)
    x.requires_grad_(True)
    y = tm.region_fold(x, 2, FP, FS)
    exactly(y[-1:], ref_shift.region_fold(x[-1:].detach(), 2, FP, FS), "region_fold past 2^31")
    grad = torch.empty_like(y)
    grad[-1] = randn(*y.shape[1:], g=g)
    (gx,) = torch.autograd.grad(y, x, grad)
    _, grads = oracle(lambda t: ref_shift.region_fold(t, 2, FP, FS), [x[-1:]], grad[-1:], (0,))
    check(gx[-1:], grads[0][1], grads[0][0], "region_fold backward past 2^31")


# Columns folded by 4 (62 columns: 2 of circular padding) into a projection to 3 channels; x has
# 2^31 + 29,696 elements, its last image starting past 2^31.
LB, LC, LH, LW, LP, LS = 135302, 4, 64, 62, 4, 7


def test_region_fold_linear_past_2_31():
    """region_fold_linear along columns (Hire-MLP's mlp_w1) on the last image past 2^31. Its
    backward runs kernels the tests above run at this size: the projection with identity maps,
    the fold's unfold (region_fold's backward) and the weight gradient's operand load (this
    forward's)."""
    need(1.5)  # the bf16 output
    assert (LB - 1) * LC * LH * LW > P31
    g = gen(12)
    x = torch.empty(LB, LC, LH, LW, dtype=BF16)
    x[-1] = randn(LC, LH, LW, g=g)
    weight, bias = randn(3, LC * LP, g=g, scale=0.25), randn(3, g=g)
    out = tm.region_fold_linear(x, 3, LP, weight, bias, LS)
    (x_out, e_out), _ = oracle(lambda x_, w_, b_: ref_shift.region_fold_linear(x_, 3, LP, w_, b_, LS),
                               [x[-1:], weight, bias])
    check(out[-1:], e_out, x_out, "region_fold_linear past 2^31")


def test_linear_region_unfold_past_2_31():
    """linear_region_unfold along rows (Hire-MLP's mlp_h2 and the rearrangement back): an output of
    2^31 + 442,368 elements, forward and backward on the last image."""
    need(6)  # the output (bf16) and grad_y
    C, Cin = FC, 2
    g = gen(13)
    GH = (FH + FP - 1) // FP
    y = torch.empty(FB, Cin, GH, FW, dtype=BF16)
    y[-1] = randn(Cin, GH, FW, g=g)
    weight, bias = randn(C * FP, Cin, g=g), randn(C * FP, g=g)
    y.requires_grad_(True)
    out = tm.linear_region_unfold(y, 2, FP, FH, weight, bias, FS)
    assert out.numel() > P31 and (FB - 1) * C * FH * FW < P31  # the last image straddles 2^31
    grad = torch.empty_like(out)
    grad[-1] = randn(*out.shape[1:], g=g)

    def fn(y_, w_, b_):
        return ref_shift.linear_region_unfold(y_, 2, FP, FH, w_, b_, FS)

    (x_out, e_out), grads = oracle(fn, [y[-1:], weight, bias], grad[-1:], (0,))
    check(out[-1:], e_out, x_out, "linear_region_unfold past 2^31")
    (gy,) = torch.autograd.grad(out, y, grad)
    check(gy[-1:], grads[0][1], grads[0][0], "linear_region_unfold grad_y past 2^31")


# ---- meta / fake tensors past 2^32 elements ------------------------------------------------------
# Shapes only: the fake kernels (and the C++ Meta kernel of window_attention_fwd) on tensors whose
# element counts pass 2^32 (most pass 2^36), forward through the ops' wrappers and backward through
# their C++ autograd, which calls the backward ops' fake kernels.

P32 = 1 << 32


def _gather_cases():
    B, N, C = 8, 1 << 30, 16
    x = torch.empty(B, N, C, requires_grad=True)
    index = torch.zeros(B, 64, dtype=torch.long)
    yield "gather_tokens", lambda: tm.gather_tokens(x, index), [x], (B, 64, C)
    src = torch.empty(B, 64, C, requires_grad=True)
    yield "scatter_tokens", lambda: tm.scatter_tokens(x, index, src), [x, src], (B, N, C)
    score = torch.empty(B, N - 1)
    yield "topk_tokens", lambda: tm.topk_tokens(x, score, 16, keep_first=1)[0], [x], (B, 17, C)
    logits = torch.empty(4, 8, 1 << 16, 1 << 16, requires_grad=True)
    policy = torch.empty(4, 1 << 16, requires_grad=True)
    yield "policy_softmax", lambda: tm.policy_softmax(logits, policy), [logits, policy], tuple(logits.shape)


def _window_cases():
    shape = (64, 1024, 1024, 8, 64)
    q, k, v = (torch.empty(shape, requires_grad=True) for _ in range(3))
    table = torch.empty(15 * 15, 8, requires_grad=True)
    yield ("window_attention", lambda: tm.window_attention(q, k, v, 8, 4, table), [q, k, v, table], shape)
    gq = torch.empty(64, 8, 8, 8, 64, requires_grad=True)
    yield ("window_attention global q", lambda: tm.window_attention(gq, k, v, 8), [gq, k, v], shape)


def _deform_cases():
    x = torch.empty(64, 64, 4096, 4096, requires_grad=True)
    offset = torch.empty(64, 2 * 9, 4094, 4094, requires_grad=True)
    weight = torch.empty(128, 64, 3, 3, requires_grad=True)
    bias = torch.empty(128, requires_grad=True)
    mask = torch.empty(64, 9, 4094, 4094, requires_grad=True)
    yield ("deform_conv2d", lambda: tm.deform_conv2d(x, offset, weight, bias, mask=mask),
           [x, offset, weight, bias, mask], (64, 128, 4094, 4094))


def _gnconv_cases():
    dim, order, k = 64, 3, 7
    dims = gate_dims(dim, order)
    S = sum(dims)
    x = torch.empty(64, dim, 4096, 4096, requires_grad=True)
    params = [torch.empty(2 * dim, dim, 1, 1), torch.empty(2 * dim), torch.empty(S, 1, k, k), torch.empty(S),
              [torch.empty(dims[i + 1], dims[i], 1, 1) for i in range(order - 1)],
              [torch.empty(dims[i + 1]) for i in range(order - 1)],
              torch.empty(dim, dim, 1, 1), torch.empty(dim)]
    flat = [p for group in params for p in (group if isinstance(group, list) else [group])]
    for p in flat:
        p.requires_grad_(True)
    yield ("gnconv", lambda: tm.gnconv(x, *params, order=order, scale=1 / 3), [x] + flat, tuple(x.shape))


def _shift_cases():
    B, C, H, W = 16, 64, 8192, 8192
    x = torch.empty(B, C, H, W, requires_grad=True)
    w = torch.empty(96, C, requires_grad=True)
    b = torch.empty(96, requires_grad=True)
    shifts = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    yield "shift_tokens", lambda: tm.shift_tokens(x, shifts), [x], (B, C, H, W)
    yield "shift_linear", lambda: tm.shift_linear(x, shifts, w, b), [x, w, b], (B, 96, H, W)
    yield "region_fold", lambda: tm.region_fold(x, 3, 3, 1), [x], (B, 3 * C, H, (W + 2) // 3)
    y = torch.empty(B, 3 * C, H, (W + 2) // 3, requires_grad=True)
    yield "region_unfold", lambda: tm.region_unfold(y, 3, 3, W, 1), [y], (B, C, H, W)
    wf = torch.empty(96, 4 * C, requires_grad=True)
    yield ("region_fold_linear", lambda: tm.region_fold_linear(x, 2, 4, wf, b, 2), [x, wf, b],
           (B, 96, H // 4, W))
    yu = torch.empty(B, 32, H // 4, W, requires_grad=True)
    wu = torch.empty(4 * C, 32, requires_grad=True)
    bu = torch.empty(4 * C, requires_grad=True)
    yield ("linear_region_unfold", lambda: tm.linear_region_unfold(yu, 2, 4, H, wu, bu, 2), [yu, wu, bu],
           (B, C, H, W))


FAMILIES = {"gather": _gather_cases, "window_attention": _window_cases, "deform_conv2d": _deform_cases,
            "gnconv": _gnconv_cases, "shift": _shift_cases}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fake_shapes_past_2_32(family):
    """Forward and backward shapes through FakeTensorMode, inputs of more than 2^32 elements."""
    with FakeTensorMode():
        for name, run, leaves, shape in FAMILIES[family]():
            assert max(t.numel() for t in leaves) > P32, name
            out = run()
            assert tuple(out.shape) == shape, f"{name}: output shape {tuple(out.shape)}"
            grads = torch.autograd.grad(out, leaves, torch.empty_like(out))
            for leaf, grad in zip(leaves, grads):
                assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, f"{name}: gradient shape"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_shapes_past_2_32(family):
    """The same forwards on the meta device (the ops' Meta kernels)."""
    with torch.device("meta"):
        for name, run, leaves, shape in FAMILIES[family]():
            out = run()
            assert out.device.type == "meta" and tuple(out.shape) == shape, name
