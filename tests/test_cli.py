"""The command line: info names the build, bench writes its table, JSON and chart."""
import json
import subprocess
import sys

import tokenmix
from tokenmix.__main__ import main


def test_info_names_the_build(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    build = "CPU + CUDA build" if tokenmix.info()["cuda_compiled"] else "CPU only build"
    assert build in out
    for op in ("gather_tokens", "scatter_tokens", "topk_tokens", "policy_softmax"):
        assert op in out


def test_info_dict():
    info = tokenmix.info()
    assert info["ops"]["gather_tokens"]["cpu"] and info["ops"]["gather_tokens"]["autograd"]
    assert info["ops"]["gather_tokens"]["cuda"] == info["cuda_compiled"]


def test_bench_writes_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "gather_tokens", "--reps", "2", "--no-compile", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gather_tokens" in text and "x eager" in text
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["torch"] and result["date"]
    modes = {r["mode"] for r in result["rows"]}
    assert modes == {"fwd", "fwd+bwd"}
    assert all(r["max_abs_err"] == 0.0 and r["speedup_vs_eager"] > 0 for r in result["rows"])
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "r.png").stat().st_size > 0
    except ImportError:
        pass


def test_bench_rejects_unknown_op():
    proc = subprocess.run([sys.executable, "-m", "tokenmix", "bench", "no_such_op", "--reps", "1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown op" in proc.stderr


def test_readme_performance_table_is_generated_from_results():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "readme_table.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, "README.md's performance table is stale: run benchmarks/readme_table.py"


def test_bench_amp_times_every_variant_under_autocast(tmp_path, capsys):
    out = tmp_path / "amp.json"
    assert main(["bench", "policy_softmax", "gather_tokens", "--amp", "--reps", "1", "--no-compile",
                 "--quiet", "--out", str(out)]) == 0
    assert "autocast bfloat16" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["autocast"] == "bfloat16" and result["dtype"] == "float32"
    assert {r["op"] for r in result["rows"]} == {"policy_softmax", "gather_tokens"}
