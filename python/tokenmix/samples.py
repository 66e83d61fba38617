"""Small sample arguments for every op (and the modules built on them), keyed by name.

``torch.library.opcheck``, the ``torch.compile`` tests and ``python -m tokenmix check`` all draw
from here, through :mod:`tokenmix.registry`, so that a new op brings its samples in one place.
Every builder takes ``(device, dtype)`` and returns the op's samples in that dtype, drawn from a
fixed seed in fp32 on the CPU and then converted: the same values (rounded) on every device and
in every dtype. Nothing here imports the oracles (``tokenmix.reference``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Literal, Tuple

import torch
from torch import Tensor, nn

from tokenmix.nn import DeformConv2dPack, GlobalWindowAttention, GnConv, WindowAttention
from tokenmix.ops.gnconv import gate_dims

__all__ = ["Sample", "SampleKind", "ModuleSample", "gather_tokens", "scatter_tokens", "topk_tokens",
           "policy_softmax", "window_attention", "deform_conv2d", "gnconv", "window_attention_module",
           "global_window_attention_module", "deform_conv2d_pack_module", "gnconv_module"]

# "basic": opcheck, compile and the accuracy check; "mixed": inputs that keep their own dtypes (an
# fp32 parameter beside bf16 activations), for opcheck and compile only, since the accuracy check
# runs every input in one dtype; "kernel": a shape that reaches a particular kernel path (tensor
# cores, CUTLASS, a strip kernel, a partial tile), for the accuracy check only: opcheck and
# compile see the same schema and fake kernel as with the basic samples.
SampleKind = Literal["basic", "mixed", "kernel"]


@dataclass(frozen=True)
class Sample:
    """One call of a raw op: ``torch.ops.tokenmix.<op>.default(*args, **kwargs)``.

    ``args`` follow the op's schema, which the ``tokenmix.ops`` wrapper and the oracle in
    ``tokenmix.reference`` also take positionally.
    """

    name: str
    op: str
    args: Tuple[Any, ...]
    kwargs: dict = field(default_factory=dict)
    kind: SampleKind = "basic"

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The raw op (``torch.ops.tokenmix.<op>.default``)."""
        return getattr(torch.ops.tokenmix, self.op).default

    def arg_names(self) -> List[str]:
        """The schema's name of every positional argument, for naming gradients in reports."""
        return [a.name for a in self.overload._schema.arguments][:len(self.args)]


@dataclass(frozen=True)
class ModuleSample:
    """A ``tokenmix.nn`` module (fp32, on the CPU, seeded) and its inputs; the accuracy check
    passes the parameters beside the inputs through ``torch.func.functional_call``."""

    name: str
    module: nn.Module
    inputs: Tuple[Tensor, ...]
    input_names: Tuple[str, ...]


class _Draw:
    """Seeded fp32 draws on the CPU, converted to (device, dtype) on request."""

    def __init__(self, device: str, dtype: torch.dtype, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype = device, dtype

    def to(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return t.to(self.device, dtype or self.dtype)

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
        return self.to(scale * torch.randn(*shape, generator=self.gen), dtype)

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return self.to(torch.rand(*shape, generator=self.gen), dtype)

    def index(self, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen, dtype=dtype).to(self.device)

    def unique_index(self, rows: int, high: int, k: int) -> Tensor:
        return torch.stack([torch.randperm(high, generator=self.gen)[:k] for _ in range(rows)]).to(self.device)


# ---- sparse-token gather ------------------------------------------------------------------------

def gather_tokens(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """Duplicated indices into ``[B, N, C]`` tokens, and ``[B, N]`` values with int32 indices."""
    r = _Draw(device, dtype)
    return [
        Sample("gather_tokens", "gather_tokens", (r.randn(3, 11, 8), r.index(11, 3, 5))),
        Sample("gather_tokens_2d_int32", "gather_tokens", (r.randn(3, 11), r.index(11, 3, 5, dtype=torch.int32))),
    ]


def scatter_tokens(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = _Draw(device, dtype)
    return [Sample("scatter_tokens", "scatter_tokens",
                   (r.randn(3, 11, 8), r.unique_index(3, 11, 5), r.randn(3, 5, 8)))]


def topk_tokens(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    r = _Draw(device, dtype)
    return [Sample("topk_tokens", "topk_tokens", (r.randn(3, 11, 8), r.randn(3, 10), 4), {"keep_first": 1})]


def policy_softmax(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """DynamicViT's shapes in miniature, and the accepted mix: an fp32 policy beside bf16 logits."""
    r = _Draw(device, dtype)
    mixed = _Draw(device, torch.bfloat16)
    return [
        Sample("policy_softmax", "policy_softmax", (r.randn(3, 2, 11, 11), r.rand(3, 11), 1e-6)),
        Sample("policy_softmax_fp32_policy", "policy_softmax",
               (mixed.randn(2, 2, 7, 7), mixed.rand(2, 7, dtype=torch.float32), 1e-6), kind="mixed"),
    ]


# ---- windowed attention -------------------------------------------------------------------------

def window_attention(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """Shifted windows and GC ViT's global queries; the accepted mix (an fp32 bias table beside
    bf16 q, k, v); and, for the accuracy check, the CUDA kernels' paths: head_dim 16 and 32 (32
    with at most 64 tokens a window runs fp16/bf16 forwards on tensor cores), partial border
    windows, a rectangular window."""
    r = _Draw(device, dtype)
    q, k, v = (r.randn(2, 8, 8, 2, 8) for _ in range(3))
    out = [
        Sample("window_attention_shifted", "window_attention",
               (q, k, v, [4, 4], [2, 2], r.randn(49, 2), None)),
        Sample("window_attention_global_q", "window_attention",
               (r.randn(2, 4, 4, 2, 8), k, v, [4, 4], [0, 0], r.randn(49, 2), 0.3)),
    ]
    mixed = _Draw(device, torch.bfloat16)
    mq, mk, mv = (mixed.randn(2, 8, 8, 2, 8) for _ in range(3))
    out.append(Sample("window_attention_fp32_table", "window_attention",
                      (mq, mk, mv, [4, 4], [2, 2], mixed.randn(49, 2, dtype=torch.float32), None),
                      kind="mixed"))
    for d in (16, 32):
        q, k, v = (r.randn(2, 14, 14, 2, d) for _ in range(3))
        pk, pv = r.randn(2, 13, 11, 2, d), r.randn(2, 13, 11, 2, d)
        out += [
            Sample(f"window_attention_d{d}_shifted", "window_attention",
                   (q, k, v, [7, 7], [3, 3], r.randn(169, 2), None), kind="kernel"),
            Sample(f"window_attention_d{d}_partial", "window_attention",
                   (r.randn(2, 13, 11, 2, d), pk, pv, [7, 7], [0, 0], None, None), kind="kernel"),
            Sample(f"window_attention_d{d}_global_q", "window_attention",
                   (r.randn(2, 7, 7, 2, d), pk, pv, [7, 7], [0, 0], r.randn(169, 2), None), kind="kernel"),
        ]
    q, k, v = (r.randn(2, 13, 11, 2, 16) for _ in range(3))
    out.append(Sample("window_attention_rect_partial", "window_attention",
                      (q, k, v, [4, 6], [0, 0], None, None), kind="kernel"))
    return out


# ---- deformable convolution ---------------------------------------------------------------------

def deform_conv2d(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """DCNv2 with 2 groups and 2 offset groups; for the accuracy check also LIT's merge (k = s = 2,
    40 channels: two full 16-channel runs per sampling item and a tail) and a layer whose fp16/bf16
    CUDA forward runs the fused kernel across two output-channel block columns, with chunks that
    cross taps and offset groups and a partial row block."""
    r = _Draw(device, dtype)
    return [
        Sample("deform_conv2d", "deform_conv2d",
               (r.randn(2, 4, 6, 6), r.randn(2, 2 * 2 * 9, 6, 6), r.randn(4, 2, 3, 3), r.randn(4),
                [1, 1], [1, 1], [1, 1], r.rand(2, 2 * 9, 6, 6))),
        Sample("deform_conv2d_k2_s2_40ch", "deform_conv2d",
               (r.randn(1, 40, 10, 12), r.randn(1, 2 * 4, 5, 6), r.randn(8, 40, 2, 2, scale=1 / 8), None,
                [2, 2], [0, 0], [1, 1], None), kind="kernel"),
        Sample("deform_conv2d_fused_136_out", "deform_conv2d",
               (r.randn(3, 12, 5, 5), r.randn(3, 2 * 2 * 9, 5, 5, scale=2.0), r.randn(136, 12, 3, 3, scale=0.1),
                r.randn(136), [1, 1], [1, 1], [1, 1], r.rand(3, 2 * 9, 5, 5)), kind="kernel"),
    ]


# ---- recursive gated convolution ----------------------------------------------------------------

def _gnconv_args(r: _Draw, dim: int, order: int, k: int, hw: Tuple[int, int], batch: int = 2) -> tuple:
    dims = gate_dims(dim, order)
    s = sum(dims)

    def w(*shape: int, fan_in: int) -> Tensor:
        return r.randn(*shape, scale=fan_in ** -0.5)

    pw = [w(dims[i + 1], dims[i], 1, 1, fan_in=dims[i]) for i in range(order - 1)]
    pb = [r.randn(dims[i + 1], scale=0.5) for i in range(order - 1)]
    return (r.randn(batch, dim, *hw), w(2 * dim, dim, 1, 1, fan_in=dim), r.randn(2 * dim, scale=0.5),
            w(s, 1, k, k, fan_in=k * k), r.randn(s, scale=0.5), pw, pb, w(dim, dim, 1, 1, fan_in=dim),
            r.randn(dim, scale=0.5))


def gnconv(device: str, dtype: torch.dtype = torch.float32) -> List[Sample]:
    """Order 3 on a small map; for the accuracy check also the depthwise strip kernels (3, 5, 7),
    the generic depthwise kernel (9), a channels_last input, and widths in multiples of 8 with 198
    rows (fp16/bf16 CUDA: the CUTLASS gated GEMMs with a partial tile)."""
    r = _Draw(device, dtype)
    out = [Sample("gnconv", "gnconv", _gnconv_args(r, 8, 3, 3, (5, 6)), {"order": 3, "scale": 0.5})]
    for k in (3, 5, 7, 9):
        out.append(Sample(f"gnconv_{k}x{k}", "gnconv", _gnconv_args(r, 8, 3, k, (9, 11)),
                          {"order": 3, "scale": 1 / 3}, kind="kernel"))
    x, *params = _gnconv_args(r, 8, 3, 7, (9, 11))
    out.append(Sample("gnconv_channels_last", "gnconv", (x.to(memory_format=torch.channels_last), *params),
                      {"order": 3, "scale": 1 / 3}, kind="kernel"))
    out.append(Sample("gnconv_32ch", "gnconv", _gnconv_args(r, 32, 3, 7, (9, 11)),
                      {"order": 3, "scale": 1 / 3}, kind="kernel"))
    return out


# ---- modules ------------------------------------------------------------------------------------

def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    # Module constructors draw from the global generator; a forked one leaves the caller's alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return build()


def window_attention_module() -> ModuleSample:
    """Swin's shifted-window attention on an 8x8 map, 2 heads of 16."""
    mod = _seeded(lambda: WindowAttention(32, 2, window_size=4, shift_size=2))
    return ModuleSample("WindowAttention", mod, (_Draw("cpu", torch.float32).randn(2, 8, 8, 32),), ("x",))


def global_window_attention_module() -> ModuleSample:
    """GC ViT's global-query attention: one window of queries per image."""
    mod = _seeded(lambda: GlobalWindowAttention(32, 2, window_size=4))
    r = _Draw("cpu", torch.float32)
    return ModuleSample("GlobalWindowAttention", mod, (r.randn(2, 8, 8, 32), r.randn(2, 4, 4, 32)),
                        ("x", "q_global"))


def deform_conv2d_pack_module() -> ModuleSample:
    """A 3x3 DCN layer with its offset branch, the offsets made non-zero."""
    def build() -> nn.Module:
        mod = DeformConv2dPack(6, 8, 3, padding=1)
        with torch.no_grad():
            mod.conv_offset.weight.normal_(0, 0.2)
            mod.conv_offset.bias.normal_(0, 0.5)
        return mod

    return ModuleSample("DeformConv2dPack", _seeded(build), (_Draw("cpu", torch.float32).randn(2, 6, 7, 9),),
                        ("x",))


def gnconv_module() -> ModuleSample:
    """HorNet's gnconv of order 3 on 16 channels."""
    mod = _seeded(lambda: GnConv(16, order=3))
    return ModuleSample("GnConv", mod, (_Draw("cpu", torch.float32).randn(2, 16, 7, 6),), ("x",))
