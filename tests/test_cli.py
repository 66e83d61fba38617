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
    assert main(["bench", "gather_tokens", "--reps", "2", "--no-compile", "--quiet", "--threads", "2,1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gather_tokens" in text and "x eager" in text
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["torch"] and result["date"]
    assert result["threads"] == [2, 1] and result["failed"] == []
    assert {(r["mode"], r["threads"]) for r in result["rows"]} == {(m, n) for m in ("fwd", "fwd+bwd") for n in (2, 1)}
    assert all(r["pct_of_copy"] and r["pct_of_gemm"] is None for r in result["rows"])
    modes = {r["mode"] for r in result["rows"]}
    assert modes == {"fwd", "fwd+bwd"}
    assert all(r["max_abs_err"] == 0.0 and r["speedup_vs_eager"] > 0 for r in result["rows"])
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "r.png").stat().st_size > 0
    except ImportError:
        pass


def test_bench_compute_bound_case_reports_its_share_of_gemm():
    """A case that declares its FLOPs gets GFLOP/s and a share of the same-run GEMM rate; a case
    that raises is listed under ``failed`` and the others still run."""
    import torch

    from tokenmix.bench import harness

    n = 64

    def make(device, dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        return [a, b], [a, b]

    def broken(a, b):
        raise RuntimeError("no kernel for this case")

    cases = [harness.Case("mm", "64^3", make, torch.mm, torch.mm, flops_fwd=2 * n ** 3, flops_bwd=4 * n ** 3),
             harness.Case("mm", "broken", make, broken, torch.mm)]
    result = harness.run(cases, torch.device("cpu"), torch.float32, reps=2, compile_ref=False,
                         progress=False, threads=[1])
    assert [f["case"] for f in result["failed"]] == ["broken"]
    assert [(r["mode"], r["threads"]) for r in result["rows"]] == [("fwd", 1), ("fwd+bwd", 1)]
    for r in result["rows"]:
        assert r["gflops"] > 0 and r["pct_of_gemm"] > 0 and r["extra"]["gemm_gflops"] > 0
        assert abs(r["gflops"] * r["fused_ms"] * 1e6 - (2 if r["mode"] == "fwd" else 6) * n ** 3) < 1e-3 * n ** 3


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


def test_readme_tables_merge_a_partial_rerun(tmp_path, monkeypatch):
    """A rerun of some cases (``selection``) replaces just their rows; files older than the newest
    full run are not read."""
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("readme_table", os.path.join(root, "benchmarks", "readme_table.py"))
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    monkeypatch.setattr(rt, "RESULTS", str(tmp_path))
    monkeypatch.setattr(rt, "ROOT", str(tmp_path))

    def result(date, cases, selection=None):
        rows = [{"op": "op", "case": c, "mode": "fwd", "threads": 1, "fused_ms": ms} for c, ms in cases]
        return {"device": "cpu0", "device_type": "cpu", "dtype": "float32", "autocast": None, "date": date,
                "rows": rows, "selection": selection}

    files = {"a.json": result("2026-01-01", [("stale", 9.0), ("x", 9.0)]),
             "b.json": result("2026-01-02", [("x", 1.0), ("y", 2.0)]),
             "c.json": result("2026-01-03", [("y", 3.0)], selection=["op"]),
             # The same day, later: its time orders it after c.json whatever the names.
             "a2.json": dict(result("2026-01-03", [("x", 4.0)], selection=["op"]), time="09:00:00")}
    for name, r in files.items():
        (tmp_path / name).write_text(json.dumps(r))
    (merged,) = rt.latest_results()
    assert [(row["case"], row["fused_ms"], row["_date"]) for row in merged["rows"]] == [
        ("x", 4.0, "2026-01-03"), ("y", 3.0, "2026-01-03")]
    assert merged["_files"] == ["a2.json", "c.json"]
