// Runtime choice between CPU kernels built for the baseline ISA, AVX2+FMA and AVX-512.
// Each op's <op>_cpu*.cpp files are compiled once per capability (CMake), each build defining its
// own kernel-table function; the op picks the widest one this processor runs.
// TOKENMIX_CPU_CAPABILITY=default|avx2|avx512 caps the choice.
#pragma once

namespace tokenmix {

enum class CpuLevel : int { Default = 0, Avx2 = 1, Avx512 = 2 };

CpuLevel cpu_level();
const char* cpu_capability_name();

}  // namespace tokenmix

// Name of the function that returns one capability build's kernel table.
#if defined(TOKENMIX_CPU_AVX512)
#define TM_CPU_KERNELS(family) family##_cpu_kernels_avx512
#elif defined(TOKENMIX_CPU_AVX2)
#define TM_CPU_KERNELS(family) family##_cpu_kernels_avx2
#else
#define TM_CPU_KERNELS(family) family##_cpu_kernels_default
#endif

// Declares a family's capability builds of its kernel table and family##_cpu_kernels(), which
// returns the build this processor runs. Use inside the family's namespace.
#if defined(TOKENMIX_HAVE_X86_KERNELS)
#define TM_DECLARE_CPU_KERNELS(family, Table)                       \
  const Table& family##_cpu_kernels_default();                      \
  const Table& family##_cpu_kernels_avx2();                         \
  const Table& family##_cpu_kernels_avx512();                       \
  inline const Table& family##_cpu_kernels() {                      \
    switch (cpu_level()) {                                          \
      case CpuLevel::Avx512:                                        \
        return family##_cpu_kernels_avx512();                       \
      case CpuLevel::Avx2:                                          \
        return family##_cpu_kernels_avx2();                         \
      default:                                                      \
        return family##_cpu_kernels_default();                      \
    }                                                               \
  }
#else
#define TM_DECLARE_CPU_KERNELS(family, Table)  \
  const Table& family##_cpu_kernels_default(); \
  inline const Table& family##_cpu_kernels() { return family##_cpu_kernels_default(); }
#endif
