# Locates CUTLASS/CuTe headers without vendoring them.
# Order: CUTLASS_DIR (cache or environment), then the nvidia-cutlass Python package,
# which ships the headers under cutlass_library/source/include.
# The package is located without importing it: only its headers are needed (install it with
# --no-deps). Defines tokenmix::cutlass when found; without it the CUTLASS kernels (gnconv's gated
# GEMMs) fall back to ATen GEMMs plus elementwise passes.

set(CUTLASS_DIR "$ENV{CUTLASS_DIR}" CACHE PATH "CUTLASS source or install tree (holds include/cutlass)")

set(_tm_cutlass_include "")
if(CUTLASS_DIR AND EXISTS "${CUTLASS_DIR}/include/cutlass/cutlass.h")
  set(_tm_cutlass_include "${CUTLASS_DIR}/include")
elseif(Python_EXECUTABLE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source', 'include'))"
    OUTPUT_VARIABLE _tm_pkg_include OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
    RESULT_VARIABLE _tm_rc)
  if(_tm_rc EQUAL 0 AND EXISTS "${_tm_pkg_include}/cutlass/cutlass.h")
    set(_tm_cutlass_include "${_tm_pkg_include}")
  endif()
endif()

if(_tm_cutlass_include)
  add_library(tokenmix_cutlass INTERFACE)
  add_library(tokenmix::cutlass ALIAS tokenmix_cutlass)
  target_include_directories(tokenmix_cutlass SYSTEM INTERFACE "${_tm_cutlass_include}")
  set(TOKENMIX_HAVE_CUTLASS ON)
  message(STATUS "tokenmix: CUTLASS headers at ${_tm_cutlass_include}")
else()
  set(TOKENMIX_HAVE_CUTLASS OFF)
  message(STATUS "tokenmix: CUTLASS not found (set CUTLASS_DIR or install nvidia-cutlass); gnconv uses its ATen fallback")
endif()
