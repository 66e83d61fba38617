"""Host-side emulation of CUDA kernels' per-thread work. The kernels' index math lives in torch-free
headers (csrc/ops/<op>/<op>_math.h) shared with the .cu files; each program in tests/cpp runs that
math for every work item in the kernels' own order and checks the result, so CI covers the
indexing of kernels it cannot launch."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ["gnconv_strip_emulation.cpp", "deform_items_emulation.cpp", "deform_fused_emulation.cpp",
            "window_index_emulation.cpp", "gather_emulation.cpp",
            "shift_emulation.cpp"]


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


@pytest.mark.parametrize("program", PROGRAMS)
def test_kernel_emulation(program, tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "emulation"
    includes = ["-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "csrc", "include")]
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", *includes,
                    os.path.join(ROOT, "tests", "cpp", program), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failures" in run.stdout
