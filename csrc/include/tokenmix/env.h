// Switches read from the environment once per process. Torch-free.
#pragma once

#include <cstdlib>
#include <cstring>

namespace tokenmix {

// False only when the variable is set to "0": the switches turn a fast path off, for comparison.
inline bool env_enabled(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace tokenmix
