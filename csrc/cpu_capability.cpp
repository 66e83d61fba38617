#include "tokenmix/cpu_capability.h"

#include <cstdlib>
#include <cstring>

namespace tokenmix {

CpuLevel cpu_level() {
#if defined(TOKENMIX_HAVE_X86_KERNELS)
  static const CpuLevel level = [] {
    __builtin_cpu_init();
    CpuLevel best = CpuLevel::Default;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuLevel::Avx2;
    if (best == CpuLevel::Avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = CpuLevel::Avx512;
    }
    const char* cap = std::getenv("TOKENMIX_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return CpuLevel::Default;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == CpuLevel::Avx512) {
      return CpuLevel::Avx2;
    }
    return best;
  }();
  return level;
#else
  return CpuLevel::Default;
#endif
}

const char* cpu_capability_name() {
  switch (cpu_level()) {
    case CpuLevel::Avx512:
      return "avx512";
    case CpuLevel::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace tokenmix
