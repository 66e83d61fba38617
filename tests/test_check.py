"""`python -m tokenmix check`: passes on this machine, and names the op, the dtype and the output
or gradient when an op is broken (a patched tokenmix.ops wrapper)."""
import subprocess
import sys

import pytest
import torch

import tokenmix.ops
from conftest import HAS_CUDA
from tokenmix import check
from tokenmix.__main__ import main


def _fail_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("FAIL")]


def test_check_passes_on_cpu(capsys):
    """Every op and module, every sample, every CPU dtype."""
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert not _fail_lines(out)
    assert ", 0 failed" in out
    for name in tokenmix.OPS:
        assert any(line.startswith("ok") and f" {name} " in line for line in out.splitlines()), name
    for dtype in ("float32", "bfloat16", "float64"):
        assert f" {dtype} " in out


def test_check_command_line_one_op_one_dtype():
    proc = subprocess.run([sys.executable, "-m", "tokenmix", "check", "gather_tokens", "--dtype", "bf16",
                           "--no-modules"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("ok")]
    assert rows and all(" gather_tokens " in r and " bfloat16 " in r for r in rows)


def test_broken_output_fails_with_the_op_named(monkeypatch, capsys):
    real = tokenmix.ops.policy_softmax
    monkeypatch.setattr(tokenmix.ops, "policy_softmax", lambda *a: real(*a) * 1.01)
    assert main(["check", "--dtype", "float32", "--no-modules"]) == 1
    out = capsys.readouterr().out
    fails = _fail_lines(out)
    assert fails and all(" policy_softmax " in line for line in fails)
    assert any("output 0" in line for line in fails)
    assert "failed: policy_softmax (float32)" in out


def test_broken_gradient_fails(monkeypatch, capsys):
    """The forward is right, the gradient of x is 1 % too large."""
    real = tokenmix.ops.gather_tokens

    def wrong_grad(x, index):
        out = real(x, index)
        return out + 0.01 * (out - out.detach())

    monkeypatch.setattr(tokenmix.ops, "gather_tokens", wrong_grad)
    assert main(["check", "gather_tokens", "--dtype", "float32"]) == 1
    fails = _fail_lines(capsys.readouterr().out)
    assert fails and all(" gather_tokens " in line and "grad x" in line for line in fails)


def test_exception_is_a_failed_row_and_the_rest_still_runs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(tokenmix.ops, "scatter_tokens", broken)
    rows = check.run(["gather"], "cpu", torch.float32)
    failed = [r for r in rows if not r.ok]
    assert {r.target for r in failed} == {"scatter_tokens"}
    assert "RuntimeError: kernel exploded" in check.format_row(failed[0])
    assert {r.target for r in rows if r.ok} == {"gather_tokens", "topk_tokens", "policy_softmax"}


def test_selection_by_family_includes_its_modules():
    ops, modules = check.select(["window_attention"])
    assert [o.name for o in ops] == ["window_attention"]
    assert [m.name for m in modules] == ["WindowAttention", "GlobalWindowAttention"]
    ops, modules = check.select(["GnConv"])
    assert ops == [] and [m.name for m in modules] == ["GnConv"]


def test_unknown_op_is_rejected(capsys):
    assert main(["check", "no_such_op"]) == 2
    assert "unknown op" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_check_passes_on_cuda(capsys):
    assert main(["check", "--device", "cuda"]) == 0, "\n".join(_fail_lines(capsys.readouterr().out))
