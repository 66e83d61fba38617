#include "tokenmix/cpu_capability.h"

#include <cstdlib>
#include <cstring>

namespace tokenmix {

bool cpu_use_avx2() {
#if defined(TOKENMIX_HAVE_AVX2_KERNELS)
  static const bool use = [] {
    const char* forced = std::getenv("TOKENMIX_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "default") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

const char* cpu_capability_name() {
  return cpu_use_avx2() ? "avx2" : "default";
}

}  // namespace tokenmix
