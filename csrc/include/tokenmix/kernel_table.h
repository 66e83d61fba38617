// The kernel table of an op family: one struct of function pointers, `Kernels` in the family's
// <op>_problem.h, that each device fills with its own implementation. The CPU table is built once
// per CPU capability by <op>_cpu*.cpp (cpu_capability.h), the CUDA table by <op>_cuda.cpp in CUDA
// builds only. The ops in <op>.cpp are written once, as templates over the device, and reach the
// kernels through kernels<D>(): a device differs only in its table, never in the op's checks,
// allocations or composition.
#pragma once

#include <c10/core/DeviceType.h>

#include "tokenmix/cpu_capability.h"

// Declares, inside the family's namespace, family##_cpu_kernels() (the capability build this
// processor runs), family##_cuda_kernels() (defined by <op>_cuda.cpp) and kernels<D>() for
// D = c10::kCPU or c10::kCUDA.
#define TM_DECLARE_KERNELS(family, Table)                                      \
  TM_DECLARE_CPU_KERNELS(family, Table)                                        \
  const Table& family##_cuda_kernels();                                        \
  template <c10::DeviceType D>                                                 \
  const Table& kernels() {                                                     \
    static_assert(D == c10::kCPU || D == c10::kCUDA, "CPU and CUDA tables only"); \
    if constexpr (D == c10::kCPU) {                                            \
      return family##_cpu_kernels();                                           \
    } else {                                                                   \
      return family##_cuda_kernels();                                          \
    }                                                                          \
  }

// Defines getter(), which returns the family's `Kernels` table with these entries, e.g.
// TM_DEFINE_KERNELS(TM_CPU_KERNELS(gnconv), &forward, &backward).
#define TM_DEFINE_KERNELS(getter, ...)       \
  const Kernels& getter() {                  \
    static const Kernels table{__VA_ARGS__}; \
    return table;                            \
  }
