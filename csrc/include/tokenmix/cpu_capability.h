// Runtime choice between CPU kernels built for the baseline ISA and for AVX2+FMA.
// Each <op>_cpu.cpp is compiled once per capability (CMake) into its own namespace; the op picks
// the widest one this processor runs. TOKENMIX_CPU_CAPABILITY=default forces the baseline build.
#pragma once

namespace tokenmix {

bool cpu_use_avx2();
const char* cpu_capability_name();

}  // namespace tokenmix

// Name of the function that returns one capability build's kernel table.
#if defined(TOKENMIX_CPU_AVX2)
#define TM_CPU_KERNELS(family) family##_cpu_kernels_avx2
#else
#define TM_CPU_KERNELS(family) family##_cpu_kernels_default
#endif

// Declares a family's two capability builds of its kernel table and family##_cpu_kernels(), which
// returns the build this processor runs. Use inside the family's namespace.
#if defined(TOKENMIX_HAVE_AVX2_KERNELS)
#define TM_DECLARE_CPU_KERNELS(family, Table)                                              \
  const Table& family##_cpu_kernels_default();                                             \
  const Table& family##_cpu_kernels_avx2();                                                \
  inline const Table& family##_cpu_kernels() {                                             \
    return cpu_use_avx2() ? family##_cpu_kernels_avx2() : family##_cpu_kernels_default(); \
  }
#else
#define TM_DECLARE_CPU_KERNELS(family, Table)  \
  const Table& family##_cpu_kernels_default(); \
  inline const Table& family##_cpu_kernels() { return family##_cpu_kernels_default(); }
#endif
