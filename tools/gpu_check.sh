#!/usr/bin/env bash
# Prove the CUDA path on a GPU machine with no network: build tokenmix for the GPU that is there
# (all cores), run the test suite (CUDA tests included) and the GPU benchmark, and leave logs,
# JSON and charts in OUTDIR (at most 8 files, flat, so the device tool brings all of them back).
#
#   tools/gpu_check.sh OUTDIR
#
# Expects: python3 with torch (CUDA build) and pytest, nvcc, cmake, ninja, scikit-build-core.
# Extra build dependencies may be supplied as wheels in .whl/ (installed with --no-index).
# Exit status: 0 when the build, the tests and the benchmark all succeeded.
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/tokenmix-site .whl/*.whl
  export PYTHONPATH=/tmp/tokenmix-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} > "$OUT/machine.txt" 2>&1
arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')")
stamp "GPU arch sm_$arch; building"

TOKENMIX_CUDA=ON TOKENMIX_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install --no-build-isolation --no-deps -v -C build-dir=build/gpu-check -e . \
  > "$OUT/build.log" 2>&1 || { stamp "BUILD FAILED (see build.log)"; exit 1; }
"$PY" -m tokenmix info >> "$OUT/machine.txt" 2>&1
stamp "built"

# Every kernel once under memcheck first: an out-of-bounds access is named with its source line.
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" tools/cuda_smoke.py > "$OUT/tests.log" 2>&1 || status=1
else
  "$PY" tools/cuda_smoke.py > "$OUT/tests.log" 2>&1 || status=1
fi
stamp "smoke (memcheck): $(grep -c '^ok' "$OUT/tests.log") ok, $(grep -c '^FAIL' "$OUT/tests.log") failed, sanitizer: $(grep -m1 'ERROR SUMMARY' "$OUT/tests.log" || echo 'not run')"

"$PY" -m pytest tests -ra -q -p no:cacheprovider >> "$OUT/tests.log" 2>&1 || status=1
stamp "tests: $(tail -n 1 "$OUT/tests.log")"

for dtype in float16 float32; do
  "$PY" -m tokenmix bench --device cuda --dtype "$dtype" --quiet --out "$OUT/bench-cuda-$dtype.json" \
    > "$OUT/bench-$dtype.log" 2>&1 || { status=1; stamp "bench $dtype FAILED"; }
  stamp "bench $dtype done"
done
cat "$OUT"/bench-*.log >> "$OUT/summary.txt"
rm -f "$OUT"/bench-*.log
stamp "finished with status $status"
exit $status
