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

// True only when the variable is set to something other than "" or "0": switches that turn an
// extra check on.
inline bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace tokenmix
