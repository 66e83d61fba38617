"""The op registry: one entry per public op, and everything that lists ops derives from it.

``tokenmix.OPS`` and ``tokenmix.info()``, the benchmark's case selection, ``python -m tokenmix
check``, the opcheck and compile tests (samples by name), the Makefile's list of op test files
(``python -m tokenmix ops --test-files``) and the README's op table (:func:`readme_op_table`) all
read the entries below, so adding an op means adding its entry (and its folder under
``csrc/ops/<family>``), not editing each of those lists.

The oracles and the benchmark modules are named by dotted path and imported only when asked for:
importing tokenmix must not import the code it is tested against (``tokenmix.reference``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from tokenmix.samples import ModuleSample, Sample, SampleKind

__all__ = ["Family", "OpSpec", "ModuleSpec", "FAMILIES", "OPS", "MODULES", "DTYPES", "op", "select",
           "samples", "sample", "sample_names", "test_files", "readme_op_table"]

Autocast = Literal["lower", "promote", "keep"]

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# The dtypes of the API contract per device (docs/api.md, "Common rules"); the kernels are
# instantiated for all four float types, but fp16 on CPU and fp64 on CUDA are outside it.
DTYPES: Mapping[str, Tuple[torch.dtype, ...]] = {"cpu": (F32, BF16, F64), "cuda": (F32, F16, BF16)}

_SHORT = {F32: "fp32", F16: "fp16", BF16: "bf16", F64: "fp64"}


def _load(path: str):
    """``"package.module:attr"`` -> the attribute, imported now."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


@dataclass(frozen=True)
class Family:
    """Ops that share a C++ folder (``csrc/ops/<name>``), a test module and a benchmark module.

    Attributes:
        name: the folder, test and benchmark name (``gather``).
        title: how the README names the family (``sparse-token gather``).
        bench: dotted path of the module whose ``cases(batch)`` gives its benchmark cases.
        bench_batch: the batch those cases run at, per device type.
    """

    name: str
    title: str
    bench: str
    bench_batch: Mapping[str, int]

    @property
    def test_file(self) -> str:
        """The family's test module, relative to the repository root."""
        return f"tests/test_{self.name}.py"

    @property
    def source_dir(self) -> str:
        """The family's C++/CUDA folder, relative to the repository root."""
        return f"csrc/ops/{self.name}"

    def bench_cases(self, device_type: str) -> list:
        """``bench.harness.Case`` list at this device's batch (imports the benchmark module)."""
        return _load(self.bench).cases(self.bench_batch[device_type], device_type)


@dataclass(frozen=True)
class OpSpec:
    """What the rest of the package needs to know about one public op.

    Attributes:
        name: the op, the same in ``torch.ops.tokenmix``, ``tokenmix.ops`` and
            ``tokenmix.reference.<family>``.
        family: its :class:`Family` name.
        seed_models: the models whose code the op fuses, as the README names them.
        oracle: dotted path (``module:function``) of the eager oracle; it takes the op's
            arguments as the op's schema orders them.
        samples: dotted path of ``(device, dtype) -> list[Sample]``, the op's samples (by
            convention ``tokenmix.bench.<family>:<op>_samples``; see :mod:`tokenmix.samples`).
        autocast: the policy of the op's ``TM_AUTOCAST`` line in ``csrc/ops/<family>``: ``lower``
            (fp32 arguments cast to the autocast dtype), ``promote`` (all to the widest),
            ``keep`` (nothing cast).
        autocast_note: what the README adds to the policy, if anything.
        differentiable: the arguments with a gradient.
        backward_summary: the README's wording of ``differentiable`` when the list is long.
        dtypes: per device type, the dtypes of the contract (kernels exist for both devices).
    """

    name: str
    family: str
    seed_models: Tuple[str, ...]
    oracle: str
    samples: str
    autocast: Autocast
    differentiable: Tuple[str, ...]
    autocast_note: str = ""
    backward_summary: str = ""
    dtypes: Mapping[str, Tuple[torch.dtype, ...]] = field(default_factory=lambda: dict(DTYPES))

    @property
    def family_spec(self) -> Family:
        """The op's :class:`Family` entry."""
        return FAMILIES[self.family]

    @property
    def test_file(self) -> str:
        """The test module of the op's family."""
        return self.family_spec.test_file

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The raw op, ``torch.ops.tokenmix.<name>.default``."""
        return getattr(torch.ops.tokenmix, self.name).default

    def fused(self) -> Callable:
        """The ``tokenmix.ops`` wrapper, looked up at call time (so a patched one is seen)."""
        import tokenmix.ops
        return getattr(tokenmix.ops, self.name)

    def load_oracle(self) -> Callable:
        """The eager oracle (imports ``tokenmix.reference`` on first use)."""
        return _load(self.oracle)

    def make_samples(self, device: str = "cpu", dtype: torch.dtype = F32) -> List[Sample]:
        """The op's samples on `device` in `dtype` (imports the family's benchmark module)."""
        return _load(self.samples)(device, dtype)

    def has_kernel(self, dispatch_key: str) -> bool:
        """Whether this build registered a kernel for the op under ``dispatch_key``
        (``CPU``, ``CUDA``, ``Autograd``, ``AutocastCPU``, ...)."""
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenmix::{self.name}", dispatch_key)


@dataclass(frozen=True)
class ModuleSpec:
    """A ``tokenmix.nn`` module that ``python -m tokenmix check`` compares with an oracle.

    Attributes:
        name: the class name in ``tokenmix.nn``.
        ops: the ops it is built on (``check gnconv`` also checks the modules using gnconv).
        build: dotted path of ``() -> ModuleSample``, the module (fp32, CPU, seeded) and its
            inputs.
        oracle: dotted path of ``forward(module, params, *inputs)``, the module's computation
            written with the oracles, its parameters taken from ``params`` (a name -> tensor dict).
    """

    name: str
    ops: Tuple[str, ...]
    build: str
    oracle: str

    def load_oracle(self) -> Callable:
        return _load(self.oracle)

    def make(self) -> ModuleSample:
        """The module and its inputs (imports the family's benchmark module)."""
        return _load(self.build)()


_GATHER_SEED = ("DynamicViT",)

FAMILIES: Dict[str, Family] = {f.name: f for f in [
    Family("gather", "sparse-token gather", "tokenmix.bench.gather", {"cpu": 8, "cuda": 64}),
    Family("window_attention", "windowed attention", "tokenmix.bench.window_attention", {"cpu": 4, "cuda": 64}),
    Family("deform_conv2d", "deformable token merging", "tokenmix.bench.deform_conv2d", {"cpu": 4, "cuda": 64}),
    Family("gnconv", "recursive gated convolution", "tokenmix.bench.gnconv", {"cpu": 4, "cuda": 64}),
    Family("shift", "shifted / rearranged token mixing", "tokenmix.bench.shift", {"cpu": 4, "cuda": 64}),
]}

# In the order the README's op table lists them.
OPS: Dict[str, OpSpec] = {o.name: o for o in [
    OpSpec("gather_tokens", "gather", _GATHER_SEED, "tokenmix.reference.gather:gather_tokens",
           "tokenmix.bench.gather:gather_tokens_samples", "keep", ("x",)),
    OpSpec("scatter_tokens", "gather", _GATHER_SEED, "tokenmix.reference.gather:scatter_tokens",
           "tokenmix.bench.gather:scatter_tokens_samples", "promote", ("x", "src")),
    OpSpec("topk_tokens", "gather", _GATHER_SEED, "tokenmix.reference.gather:topk_tokens",
           "tokenmix.bench.gather:topk_tokens_samples", "keep", ("x",)),
    OpSpec("policy_softmax", "gather", _GATHER_SEED, "tokenmix.reference.gather:policy_softmax",
           "tokenmix.bench.gather:policy_softmax_samples", "keep", ("logits", "policy"),
           autocast_note="fp32 reductions; fp32 policy accepted"),
    OpSpec("window_attention", "window_attention", ("Swin", "GC ViT", "HAT-Net"),
           "tokenmix.reference.window_attention:window_attention", "tokenmix.bench.window_attention:window_attention_samples", "lower",
           ("q", "k", "v", "bias_table"), autocast_note="fp32 bias_table accepted"),
    OpSpec("deform_conv2d", "deform_conv2d", ("LIT (DCNv1/v2)",),
           "tokenmix.reference.deform_conv2d:deform_conv2d", "tokenmix.bench.deform_conv2d:deform_conv2d_samples", "lower",
           ("input", "offset", "weight", "bias", "mask")),
    OpSpec("gnconv", "gnconv", ("HorNet",), "tokenmix.reference.gnconv:gnconv", "tokenmix.bench.gnconv:gnconv_samples", "lower",
           ("x", "proj_in_weight", "proj_in_bias", "dw_weight", "dw_bias", "pw_weights", "pw_biases",
            "proj_out_weight", "proj_out_bias"),
           backward_summary="x and every weight and bias"),
    *[OpSpec(name, "shift", seeds, f"tokenmix.reference.shift:{name}", f"tokenmix.bench.shift_samples:{name}_samples",
             autocast, grads)
      for name, seeds, autocast, grads in [
          ("shift_tokens", ("AS-MLP", "S²-MLP", "ShiftViT"), "keep", ("x",)),
          ("shift_linear", ("AS-MLP", "CycleMLP"), "lower", ("x", "weight", "bias")),
          ("region_fold", ("Hire-MLP",), "keep", ("x",)),
          ("region_unfold", ("Hire-MLP",), "keep", ("y",)),
          ("region_fold_linear", ("Hire-MLP", "RaftMLP"), "lower", ("x", "weight", "bias")),
          ("linear_region_unfold", ("Hire-MLP", "RaftMLP"), "lower", ("y", "weight", "bias")),
      ]],
]}

MODULES: Dict[str, ModuleSpec] = {m.name: m for m in [
    ModuleSpec("WindowAttention", ("window_attention",), "tokenmix.bench.window_attention:window_attention_module_sample",
               "tokenmix.reference.modules:window_attention"),
    ModuleSpec("GlobalWindowAttention", ("window_attention",), "tokenmix.bench.window_attention:global_window_attention_module_sample",
               "tokenmix.reference.modules:global_window_attention"),
    ModuleSpec("DeformConv2dPack", ("deform_conv2d",), "tokenmix.bench.deform_conv2d:deform_conv2d_pack_module_sample",
               "tokenmix.reference.modules:deform_conv2d_pack"),
    ModuleSpec("GnConv", ("gnconv",), "tokenmix.bench.gnconv:gnconv_module_sample", "tokenmix.reference.modules:gnconv"),
    ModuleSpec("HireMLP", ("region_fold_linear", "linear_region_unfold"), "tokenmix.bench.shift_modules:hire_mlp_module_sample",
               "tokenmix.reference.shift_official:hire_mlp"),
    ModuleSpec("CycleFC", ("shift_linear",), "tokenmix.bench.shift_modules:cycle_fc_module_sample",
               "tokenmix.reference.shift_official:cycle_fc"),
    ModuleSpec("AxialShift", ("shift_linear",), "tokenmix.bench.shift_modules:axial_shift_module_sample",
               "tokenmix.reference.shift_official:axial_shift"),
    ModuleSpec("RaftTokenMixer", ("region_fold_linear", "linear_region_unfold"),
               "tokenmix.bench.shift_modules:raft_token_mixer_module_sample", "tokenmix.reference.shift_official:raft_token_mixer"),
]}


def op(name: str) -> OpSpec:
    """The entry of op `name`; ``KeyError`` naming the known ops otherwise."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(OPS)}") from None


def select(names: Optional[Iterable[str]]) -> List[OpSpec]:
    """The entries named by op or family names, in registry order; every op for none.

    Raises:
        ValueError: a name that is neither an op nor a family.
    """
    wanted = set(names or ())
    if not wanted:
        return list(OPS.values())
    unknown = wanted - set(OPS) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(set(OPS) | set(FAMILIES))}")
    return [o for o in OPS.values() if o.name in wanted or o.family in wanted]


def samples(device: str = "cpu", dtype: torch.dtype = F32, ops: Optional[Iterable[str]] = None,
            kinds: Sequence[SampleKind] = ("basic", "mixed")) -> List[Sample]:
    """The samples of the selected ops (:func:`select`) of the given kinds, in registry order.
    The default kinds are those for ``torch.library.opcheck`` and ``torch.compile``."""
    return [s for o in select(ops) for s in o.make_samples(device, dtype) if s.kind in kinds]


def sample(name: str, device: str = "cpu", dtype: torch.dtype = F32) -> Sample:
    """The sample called `name`, of any kind (``KeyError`` if none is)."""
    for o in OPS.values():
        for s in o.make_samples(device, dtype):
            if s.name == name:
                return s
    raise KeyError(f"no sample {name!r}; known: {', '.join(sample_names(kinds=('basic', 'mixed', 'kernel')))}")


def sample_names(ops: Optional[Iterable[str]] = None,
                 kinds: Sequence[SampleKind] = ("basic", "mixed")) -> List[str]:
    """The names of :func:`samples` (built on the CPU), e.g. for test parametrisation."""
    return [s.name for s in samples("cpu", F32, ops, kinds)]


def test_files(ops: Optional[Iterable[str]] = None) -> List[str]:
    """The op test modules (one per family) of the selected ops, in registry order."""
    return list(dict.fromkeys(o.test_file for o in select(ops)))


def readme_op_table(validation: Optional[Mapping[str, str]] = None) -> str:
    """The README's op table as markdown: one row per op, in registry order. `validation` gives
    each op's "GPU validation" cell (benchmarks/readme_table.py derives it from the recorded GPU
    runs); an op it does not name has not run on a GPU."""
    def yes(device: str) -> str:
        return "yes" if device in o.dtypes else "–"

    def dtypes(device: str) -> str:
        return ", ".join(_SHORT[d] for d in o.dtypes.get(device, ())) or "–"

    lines = ["| op | family | seed model | CPU | CUDA | dtypes (CPU / CUDA) | autocast | backward | GPU validation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in OPS.values():
        autocast = o.autocast + (f" ({o.autocast_note})" if o.autocast_note else "")
        backward = o.backward_summary or ", ".join(o.differentiable)
        lines.append(f"| `{o.name}` | {o.family_spec.title} | {', '.join(o.seed_models)} | {yes('cpu')} "
                     f"| {yes('cuda')} | {dtypes('cpu')} / {dtypes('cuda')} | {autocast} | {backward} "
                     f"| {(validation or {}).get(o.name, 'not run on a GPU')} |")
    return "\n".join(lines)
