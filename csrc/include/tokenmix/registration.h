// Dispatcher registrations of an op family, one line per op and dispatch key. Each <op>.cpp
// defines its schemas with def(m, "...") in a TORCH_LIBRARY_FRAGMENT(tokenmix, m) block and
// registers its kernels with
//   TM_IMPL(name, op_template) op_template<c10::kCPU> for CPU and, in a CUDA build,
//                              op_template<c10::kCUDA> for CUDA: the op, written once as a
//                              template over the device (kernel_table.h)
//   TM_AUTOGRAD(name, Fn)      the autograd::Function Fn for Autograd (autograd.h)
//   TM_AUTOCAST(name, policy)  the autocast policy (autocast.h)
// Each line is a TORCH_LIBRARY_IMPL block of its own; the dispatcher merges them.
#pragma once

#include <torch/library.h>

#include "tokenmix/autocast.h"
#include "tokenmix/autograd.h"

#if defined(TOKENMIX_WITH_CUDA)
#define TM_IF_CUDA(...) __VA_ARGS__
#else
#define TM_IF_CUDA(...)
#endif

namespace tokenmix {

// A schema of the tokenmix library, tagged pt2-compliant (torch.compile may trace it as is).
inline void def(torch::Library& m, const char* schema) {
  m.def(schema, {at::Tag::pt2_compliant_tag});
}

}  // namespace tokenmix

#define TM_IMPL(name, op_template)                                              \
  TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {                                        \
    m.impl(name, &op_template<c10::kCPU>);                                      \
  }                                                                             \
  TM_IF_CUDA(TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) { m.impl(name, &op_template<c10::kCUDA>); })

// TM_AUTOGRAD(name, Fn) or, where Fn::forward returns a variable_list for a schema that returns a
// tuple, TM_AUTOGRAD(name, Fn, std::tuple<...>).
#define TM_AUTOGRAD(name, ...)                                                  \
  TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {                                   \
    m.impl(name, &::tokenmix::AutogradKernel<__VA_ARGS__>::call);               \
  }
