"""One small forward + backward of every op on CUDA, in every CUDA dtype, compared with the CPU
result. Meant to run under `compute-sanitizer --tool memcheck` (tools/gpu_check.sh does), where
an out-of-bounds access in any kernel is reported with its source line; also a quick sanity check
on its own. Exits non-zero on a mismatch."""
from __future__ import annotations

import sys

import torch

import tokenmix.ops as tm


def cases():
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    x, idx = r(3, 11, 8), torch.randint(0, 11, (3, 5), generator=g)
    uniq = torch.stack([torch.randperm(11, generator=g)[:5] for _ in range(3)])
    yield "gather_tokens", tm.gather_tokens, [x, idx]
    yield "scatter_tokens", tm.scatter_tokens, [x, uniq, r(3, 5, 8)]
    yield "topk_tokens", lambda a, s: tm.topk_tokens(a, s, 4, keep_first=1)[0], [x, r(3, 10)]
    yield "policy_softmax", tm.policy_softmax, [r(2, 3, 9, 9), torch.rand(2, 9, generator=g)]
    q, k, v = r(2, 14, 14, 2, 16), r(2, 14, 14, 2, 16), r(2, 14, 14, 2, 16)
    yield "window_attention shifted", lambda q, k, v, t: tm.window_attention(
        q, k, v, window_size=7, shift_size=3, bias_table=t), [q, k, v, r(169, 2)]
    yield "window_attention partial", lambda q, k, v: tm.window_attention(
        q, k, v, window_size=(4, 6)), [q[:, :13, :11], k[:, :13, :11], v[:, :13, :11]]
    yield "window_attention global q", lambda q, k, v, t: tm.window_attention(
        q, k, v, window_size=7, bias_table=t), [r(2, 7, 7, 2, 16), k, v, r(169, 2)]
    # head_dim 32, <= 64 tokens: fp16/bf16 forwards run on tensor cores.
    yield "window_attention d32 shifted", lambda q, k, v, t: tm.window_attention(
        q, k, v, window_size=7, shift_size=3, bias_table=t), [
        r(2, 14, 14, 2, 32), r(2, 14, 14, 2, 32), r(2, 14, 14, 2, 32), r(169, 2)]
    k32, v32 = r(2, 13, 11, 2, 32), r(2, 13, 11, 2, 32)
    yield "window_attention d32 partial", lambda q, k, v: tm.window_attention(
        q, k, v, window_size=7), [r(2, 13, 11, 2, 32), k32, v32]
    yield "window_attention d32 global q", lambda q, k, v, t: tm.window_attention(
        q, k, v, window_size=7, bias_table=t), [r(2, 7, 7, 2, 32), k32, v32, r(169, 2)]
    off = 2 * r(2, 2 * 2 * 9, 6, 6)
    yield "deform_conv2d", lambda a, o, w, b, m: tm.deform_conv2d(a, o, w, b, padding=1, mask=m), [
        r(2, 4, 6, 6), off, r(4, 4, 3, 3), r(4), torch.rand(2, 2 * 9, 6, 6, generator=g)]
    # LIT's merge shape with 40 channels: two full runs of 16 channels per sampling item and a tail.
    yield "deform_conv2d k2 s2 40ch", lambda a, o, w: tm.deform_conv2d(a, o, w, stride=2), [
        r(1, 40, 10, 12), r(1, 2 * 4, 5, 6), r(8, 40, 2, 2) / 8]
    # fp16/bf16 forwards run the fused kernel: 136 output channels take two block columns, 2 offset
    # groups and K = 9 * 12 leave chunks that cross taps and groups, 75 pixels a partial row block.
    yield "deform_conv2d fused 136 out", lambda a, o, w, b, m: tm.deform_conv2d(
        a, o, w, b, padding=1, mask=m), [r(3, 12, 5, 5), 2 * r(3, 2 * 2 * 9, 5, 5), r(136, 12, 3, 3) / 10,
                                         r(136), torch.rand(3, 2 * 9, 5, 5, generator=g)]

    def gnconv(x, wi, bi, wd, bd, pw0, pw1, pb0, pb1, wo, bo):
        return tm.gnconv(x, wi, bi, wd, bd, [pw0, pw1], [pb0, pb1], wo, bo, order=3, scale=1 / 3)
    gn = [r(16, 8, 1, 1), r(16), r(14, 1, 7, 7) / 7, r(14), r(4, 2, 1, 1), r(8, 4, 1, 1), r(4), r(8),
          r(8, 8, 1, 1), r(8)]
    yield "gnconv", gnconv, [r(2, 8, 9, 11)] + gn
    yield "gnconv channels_last", lambda x, *w: gnconv(x.to(memory_format=torch.channels_last), *w), \
        [r(2, 8, 9, 11)] + gn
    for k in (3, 5, 9):  # the other strip kernels, and the generic depthwise kernel
        yield f"gnconv {k}x{k}", gnconv, [r(2, 8, 9, 11)] + gn[:2] + [r(14, 1, k, k) / k] + gn[3:]
    # Widths in multiples of 8 (dims 8, 16, 32): fp16/bf16 take the CUTLASS gated GEMMs; 198 rows
    # leave a partial tile.
    gn32 = [r(64, 32, 1, 1) / 6, r(64), r(56, 1, 7, 7) / 7, r(56), r(16, 8, 1, 1) / 3, r(32, 16, 1, 1) / 4,
            r(16), r(32), r(32, 32, 1, 1) / 6, r(32)]
    yield "gnconv 32ch (gated GEMMs)", gnconv, [r(2, 32, 9, 11)] + gn32


def run(fn, inputs, device, dtype, rounded_to=None):
    # The reference starts from the inputs rounded to the tested dtype: bilinear sampling's offset
    # gradient jumps where a rounded offset crosses an integer, which no tolerance can absorb.
    ins = [(t.to(rounded_to) if rounded_to is not None else t).to(device, dtype).requires_grad_()
           if t.is_floating_point() else t.to(device) for t in inputs]
    out = fn(*ins)
    grads = torch.autograd.grad(out, [t for t in ins if t.requires_grad], torch.ones_like(out),
                                allow_unused=True)
    return [out] + [gr for gr in grads if gr is not None]


def main() -> int:
    failed = 0
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
    for name, fn, inputs in cases():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ref = run(fn, inputs, "cpu", torch.float64, rounded_to=dtype)
            got = run(fn, inputs, "cuda", dtype)
            torch.cuda.synchronize()
            err = max((a.double().cpu() - b).abs().max().item() / (1 + b.abs().max().item())
                      for a, b in zip(got, ref))
            ok = err <= tol[dtype]
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:<28} {str(dtype):<16} rel err {err:.2e}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
