// Per-thread scratch memory for the CPU kernels, kept between calls so that the kernels do not
// fault in fresh pages every time: one buffer per slot, which grows to the largest size asked of
// it. Cache-line aligned, so that a GEMM into it sees the same alignment whichever thread runs it.
// Left uninitialised: every kernel writes before it reads. Per capability (cpu/per_isa.h).
#pragma once

#include <cstdint>
#include <memory>
#include <new>

#include "cpu/per_isa.h"

namespace tokenmix {
namespace cpu {
inline namespace CPU_CAPABILITY {

struct AlignedFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(64)); }
};

template <typename A>
using AlignedBuffer = std::unique_ptr<A[], AlignedFree>;

template <typename A>
AlignedBuffer<A> aligned_buffer(int64_t n) {
  return AlignedBuffer<A>(static_cast<A*>(::operator new[](n * sizeof(A), std::align_val_t(64))));
}

// The calling thread's buffer for `slot`, of at least n elements. Slots is an enum (class) of an
// op's uses whose last enumerator is kCount; each (A, Slots) pair has buffers of its own.
template <typename A, typename Slots>
A* scratch(Slots slot, int64_t n) {
  constexpr int kCount = static_cast<int>(Slots::kCount);
  static thread_local AlignedBuffer<A> buf[kCount];
  static thread_local int64_t cap[kCount] = {};
  const int i = static_cast<int>(slot);
  if (n > cap[i]) {
    buf[i] = aligned_buffer<A>(n);
    cap[i] = n;
  }
  return buf[i].get();
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace tokenmix
