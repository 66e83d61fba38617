# tokenmix: the two commands are `make test` and `make demo`; both prepare everything first.
#
#   make setup      .venv with torch and the build tools, tokenmix built and installed (editable)
#   make test       setup + the test suite (CUDA tests skip without a GPU)
#   make demo       setup + `python -m tokenmix demo`
#   make bench      setup + the CPU benchmark, written to benchmarks/results/
#   make test-cpu-only   a build with TOKENMIX_CUDA=OFF, its info, the test suite, and the op tests
#                        again on the baseline-ISA and the AVX2 CPU kernels (TOKENMIX_CPU_CAPABILITY)
#   make test-sanitize   a CPU-only build of the baseline-ISA kernels with AddressSanitizer and
#                        UndefinedBehaviorSanitizer (float casts and divisions included), and the op
#                        tests under it; any report fails the run
#
# Variables: PYTHON (interpreter that creates the venv), TORCH (the torch requirement; the CPU
# build works too, e.g. TORCH="torch==2.13.0"), CUTLASS (the nvidia-cutlass requirement),
# TOKENMIX_CUDA=AUTO|ON|OFF, TOKENMIX_CUDA_ARCHS.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
CUTLASS ?= nvidia-cutlass==4.2.0.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tokenmix-deps
# The op families' test files, from the op registry (read when the recipe runs, after the build).
OP_TESTS = $$($(PY) -m tokenmix ops --test-files)

.PHONY: setup test demo bench test-cpu-only test-sanitize clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)" "scikit-build-core>=0.10" "ninja>=1.10" numpy
	@if ! cmake --version 2>/dev/null | awk 'NR==1 { split($$3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 25)) }'; then \
		echo "no CMake >= 3.25 on PATH: installing it into $(VENV)"; \
		$(PIP) install "cmake>=3.25,<4"; \
	fi
	touch $@

# CUTLASS's headers for the CUDA build (gnconv's gated GEMMs), checked on every setup so that an
# older .venv gets them too; only the headers are used, hence --no-deps.
setup: $(STAMP)
	$(PIP) install -q --no-deps "$(CUTLASS)"
	$(PIP) install --no-build-isolation -e ".[test,bench]"

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) -m tokenmix demo

bench: setup
	$(PY) -m tokenmix bench --device cpu --out benchmarks/results/cpu-$$(date +%Y-%m-%d).json

# The CPU-only build links libstdc++ statically, as some compiler wrappers do, so that the tests
# (error messages with numbers in them) prove the module keeps that copy to itself.
test-cpu-only: $(STAMP)
	TOKENMIX_CUDA=OFF $(PIP) install --no-build-isolation -C build-dir=build/cpu-only \
	  -C cmake.define.CMAKE_MODULE_LINKER_FLAGS=-static-libstdc++ -e ".[test,bench]"
	$(PY) -m tokenmix info
	$(PY) -c "import tokenmix, sys; sys.exit(1 if tokenmix.info()['cuda_compiled'] else 0)"
	$(PY) -c "import subprocess, sys, tokenmix._C as m; \
	  sys.exit('libstdc++ linked dynamically' if 'libstdc++' in subprocess.check_output(['readelf', '-d', m.__file__], text=True) else 0)"
	$(PY) -m pytest tests -q
	TOKENMIX_CPU_CAPABILITY=default $(PY) -m pytest -q $(OP_TESTS)
	TOKENMIX_CPU_CAPABILITY=avx2 $(PY) -m pytest -q $(OP_TESTS)

# The sanitizers' runtimes are preloaded because python itself is not instrumented; every report
# aborts (-fno-sanitize-recover). Leak checking is off: the interpreter and torch keep memory for
# the life of the process by design. pytest captures at the sys level only, so that a report
# written to file descriptor 2 reaches the log before the abort.
SANITIZE := -fsanitize=address,undefined,float-cast-overflow,float-divide-by-zero -fno-sanitize-recover=all -fno-omit-frame-pointer
test-sanitize: $(STAMP)
	TOKENMIX_CUDA=OFF $(PIP) install --no-build-isolation -C build-dir=build/sanitize \
	  -C "cmake.define.CMAKE_CXX_FLAGS=$(SANITIZE)" -C "cmake.define.CMAKE_MODULE_LINKER_FLAGS=$(SANITIZE)" \
	  -C cmake.define.TOKENMIX_ISA_KERNELS=OFF -e ".[test,bench]"
	export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1; \
	  $(PY) -m pytest -q -p no:cacheprovider --capture=sys $(OP_TESTS)

clean:
	rm -rf build $(VENV)
