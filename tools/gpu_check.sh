#!/usr/bin/env bash
# Prove the CUDA path on a GPU machine with no network: build tokenmix for the GPU that is there
# (all cores), run every kernel once, the CUDA tests and the GPU benchmark, look for the next
# bottleneck, and leave logs and JSON in OUTDIR: summary.txt (machine, step results), build.log,
# tests.log, sanitize.log, bench.log, profile.log and the bench JSON files, flat, so the device tool
# brings all of them back.
#
#   tools/gpu_check.sh OUTDIR [SECONDS]
#
# A lease is short, so the steps run in order of what they prove and each one is cut off at its own
# cap and at the deadline (SECONDS after the start, default 540):
#   1. build; `python -m tokenmix check` (every op vs its oracle); the CUDA tests;
#   2. the fp16 benchmark, whose anchors are eager PyTorch, timm's SDPA path, FlexAttention
#      (compiled, window block mask, bias as score_mod) and torchvision's deform_conv2d;
#   3. compute-sanitizer racecheck, initcheck and memcheck on the op samples in fp16 (small shapes,
#      every kernel, forward and backward);
#   4. a torch.profiler table of a swin_tiny training step, accelerated and timm's (profile.log);
#   5. Nsight Compute, where `ncu` exists: speed of light (DRAM and SM throughput), occupancy,
#      tensor-pipe use and warp stall reasons, once per launch configuration of the window
#      attention, deform_conv2d, gnconv and gather kernels at the benchmark's shapes (profile.log);
#   6. the fused paths switched off (A/B) and per-kernel times of every case (bench.log);
#   7. the fp32 benchmark, the bf16 deform benchmark, the CPU tests.
#
# Expects: python3 with torch (CUDA build) and pytest, nvcc, cmake, ninja, scikit-build-core.
# Extra build dependencies come as wheels in .whl/ (installed with --no-index); CUTLASS's headers
# are one of them where the machine has no nvidia-cutlass:
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0
# Exit status: 0 when every step that ran succeeded and none was skipped for lack of time.
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
# step NAME CAP LOG CMD...: run CMD for at most min(CAP, time left), appending to LOG.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local t; t=$(left)
  (( t < cap )) && cap=$t
  if (( cap < 15 )); then stamp "$name: SKIPPED (out of time)"; status=1; return 1; fi
  echo "=== $name" >> "$log"
  timeout --kill-after=5 "$cap" "$@" >> "$log" 2>&1
  local rc=$?
  (( rc == 124 || rc == 137 )) && stamp "$name: TIMED OUT after ${cap}s"
  (( rc != 0 )) && status=1
  return $rc
}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/tokenmix-site .whl/*.whl
  export PYTHONPATH=/tmp/tokenmix-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  lscpu | grep -E 'Model name|Flags' | cut -c1-200
} > "$OUT/summary.txt" 2>&1
arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')")
stamp "GPU arch sm_$arch; building"

export TOKENMIX_CUDA=ON TOKENMIX_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
step build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v \
  -C build-dir=build/gpu-check -e . || { stamp "BUILD FAILED (see build.log)"; exit 1; }
"$PY" -m tokenmix info >> "$OUT/summary.txt" 2>&1
"$PY" -c "import sys, tokenmix; sys.exit(0 if tokenmix.info()['cutlass'] else 1)" ||
  { stamp "WARNING: built without CUTLASS (no nvidia-cutlass wheel in .whl/?)"; status=1; }
stamp "built"

step check 90 "$OUT/tests.log" "$PY" -m tokenmix check --device cuda
stamp "check: $(grep -c '^ok' "$OUT/tests.log") ok, $(grep -c '^FAIL' "$OUT/tests.log") failed"

PYTEST=("$PY" -m pytest tests -ra -q -p no:cacheprovider)
"$PY" -c "import xdist" 2> /dev/null && PYTEST+=(-n 6)
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout 120)
step "cuda tests" 200 "$OUT/tests.log" "${PYTEST[@]}" -m cuda
stamp "cuda tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"

bench() {
  step "bench $1" "$2" "$OUT/bench.log" "$PY" -m tokenmix bench --device cuda --dtype "$1" --no-compile \
    --quiet --reps 20 --out "$OUT/bench-cuda-$1.json"
  stamp "bench $1: rc $?"
}
bench float16 180

# Sanitizers on the op samples (small shapes: every kernel, forward and backward) in fp16, where
# the tensor-core kernels run. racecheck: shared-memory hazards; initcheck: reads of global memory
# nothing wrote; memcheck: out-of-bounds and misaligned accesses.
if command -v compute-sanitizer > /dev/null; then
  for tool in racecheck initcheck memcheck; do
    step "$tool" 80 "$OUT/sanitize.log" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$PY" -m tokenmix check --device cuda --no-modules --dtype float16
    stamp "$tool: rc $?, $(tail -n 4 "$OUT/sanitize.log" | grep -m1 'SUMMARY' || echo 'no summary')"
  done
else
  stamp "compute-sanitizer not found: racecheck, initcheck and memcheck not run"
fi

step "swin_tiny training profile" 75 "$OUT/profile.log" "$PY" tools/cuda_profile.py --swin-train \
  --batch 64 --rows 25
stamp "swin_tiny training profile: rc $?"
grep -h 'ms of kernels per step' "$OUT/profile.log" >> "$OUT/summary.txt"

if command -v ncu > /dev/null; then
  step "ncu" 100 "$OUT/profile.log" ncu --filter-mode per-launch-config --launch-count 1 \
    --kernel-name-base demangled -k 'regex:tokenmix::' \
    --section SpeedOfLight --section Occupancy --section ComputeWorkloadAnalysis --section WarpStateStats \
    "$PY" tools/cuda_profile.py window_attention deform_conv2d gnconv gather --iters 1 --rows 3
  stamp "ncu: rc $?, $(grep -c ', Context [0-9]*, Stream' "$OUT/profile.log") kernel reports"
else
  stamp "ncu not found: no Nsight Compute metrics"
fi

# A/B: the same fp16 cases with the new fused paths switched off (the table lands in bench.log).
TOKENMIX_GNCONV_CUTLASS=0 TOKENMIX_DEFORM_FUSED=0 TOKENMIX_WINDOW_TENSOR_CORES=0 \
  step "bench float16, fused paths off" 100 "$OUT/bench.log" "$PY" -m tokenmix bench gnconv \
  deform_conv2d window_attention --device cuda --dtype float16 --no-compile --quiet --reps 20
stamp "bench with fused paths off: rc $?"
step "kernel profile float16" 60 "$OUT/bench.log" "$PY" tools/cuda_profile.py --rows 12
stamp "kernel profile: rc $?"

bench float32 90
step "bench deform bfloat16" 60 "$OUT/bench.log" "$PY" -m tokenmix bench deform_conv2d --device cuda \
  --dtype bfloat16 --no-compile --quiet --reps 20 --out "$OUT/bench-cuda-deform-bfloat16.json"

step "cpu tests" 200 "$OUT/tests.log" "${PYTEST[@]}" -m "not cuda"
stamp "cpu tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"

rm -f "$OUT"/*.png
stamp "finished with status $status"
exit $status
