"""The op registry (tokenmix.registry) agrees with what it describes: the ops torch knows, the
C++ autocast policies, the gradients, the folders and test modules, the README's op table; and
the library does not import its oracles."""
import os
import re
import subprocess
import sys

import pytest
import torch

import tokenmix
import tokenmix.ops as tm
from tokenmix import registry
from tokenmix.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_entry_per_public_op():
    assert list(registry.OPS) == list(tokenmix.OPS)
    assert set(registry.OPS) == set(tm.__all__)
    assert set(tokenmix.info()["ops"]) == set(registry.OPS)
    for spec in registry.OPS.values():
        assert spec.family in registry.FAMILIES
        assert spec.has_kernel("CPU") and spec.has_kernel("Autograd"), spec.name
        assert spec.has_kernel("AutocastCPU"), spec.name
        assert spec.has_kernel("CUDA") == tokenmix.info()["cuda_compiled"], spec.name
        assert callable(spec.load_oracle()) and spec.fused() is getattr(tm, spec.name)


def test_autocast_policy_matches_the_cpp_registration():
    src = os.path.join(ROOT, "csrc", "ops")
    if not os.path.isdir(src):
        pytest.skip("no csrc/ here")
    policy = {"kLowerPrecision": "lower", "kPromote": "promote", "kKeep": "keep"}
    found = {}
    for family in registry.FAMILIES.values():
        folder = os.path.join(ROOT, family.source_dir)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".cpp"):
                text = open(os.path.join(folder, name)).read()
                for op, kind in re.findall(r'^TM_AUTOCAST\("(\w+)",\s*(\w+)\)', text, flags=re.M):
                    found[op] = (policy[kind], family.name)
    assert found == {name: (spec.autocast, spec.family) for name, spec in registry.OPS.items()}


def _leaf(a):
    return a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def test_differentiable_inputs_are_those_with_gradients():
    for spec in registry.OPS.values():
        s = next(s for s in spec.make_samples("cpu", torch.float64) if s.kind == "basic")
        names = s.arg_names()
        assert set(spec.differentiable) <= set(names), spec.name
        args = [[_leaf(t) for t in a] if isinstance(a, list) else _leaf(a) for a in s.args]
        outs = spec.fused()(*args, **s.kwargs)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.is_floating_point()]
        sum(o.sum() for o in outs).backward()

        def has_grad(a):
            return any(isinstance(t, torch.Tensor) and t.grad is not None for t in (a if isinstance(a, list) else [a]))
        assert {n for n, a in zip(names, args) if has_grad(a)} == set(spec.differentiable), spec.name


def test_families_have_their_folders_and_test_modules():
    for family in registry.FAMILIES.values():
        assert os.path.isfile(os.path.join(ROOT, family.test_file)), family.test_file
        if os.path.isdir(os.path.join(ROOT, "csrc")):
            assert os.path.isdir(os.path.join(ROOT, family.source_dir)), family.source_dir


def test_test_files_command(capsys):
    assert main(["ops", "--test-files"]) == 0
    assert capsys.readouterr().out.split() == [f.test_file for f in registry.FAMILIES.values()]
    assert registry.test_files(["topk_tokens", "gnconv"]) == ["tests/test_gather.py", "tests/test_gnconv.py"]


def test_readme_op_table_is_the_registry():
    """Every column but the GPU cell comes from the registry (benchmarks/readme_table.py fills
    that from the recorded GPU runs; tests/test_cli.py checks the README is regenerated)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    strip = lambda table: [row.rsplit("|", 2)[0] for row in table.splitlines()]  # noqa: E731
    rows = strip(registry.readme_op_table())
    assert all(row in readme for row in rows), "README's op table differs from registry.readme_op_table()"


def test_samples_are_named_uniquely_and_cover_every_op():
    every = registry.samples("cpu", kinds=("basic", "mixed", "kernel"))
    names = [s.name for s in every]
    assert len(names) == len(set(names))
    for s in every:
        assert s.op in registry.OPS and s.name.startswith(s.op), s.name
    assert {s.op for s in every if s.kind == "basic"} == set(registry.OPS)
    assert registry.sample("gnconv_32ch").kind == "kernel"
    with pytest.raises(KeyError, match="no sample"):
        registry.sample("nope")


def test_modules_are_built_on_registered_ops():
    for spec in registry.MODULES.values():
        assert set(spec.ops) <= set(registry.OPS)
        assert spec.name in tokenmix.nn.__all__
        assert callable(spec.load_oracle())


def test_bench_cases_come_from_the_registry():
    from tokenmix import bench
    cases = bench.select_cases(["gather"], "cpu")
    assert {c.op for c in cases} == {o.name for o in registry.select(["gather"])}
    with pytest.raises(ValueError, match="unknown op"):
        bench.select_cases(["nope"], "cpu")


def test_the_library_does_not_import_its_oracles():
    code = ("import sys, tokenmix, tokenmix.nn, tokenmix.ops, tokenmix.registry, tokenmix.samples, "
            "tokenmix.testing, tokenmix.check, tokenmix.accelerate; "
            "assert not [m for m in sys.modules if m.startswith('tokenmix.reference')], 'imported'; "
            "assert callable(tokenmix.reference.gather.gather_tokens)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
