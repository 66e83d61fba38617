// Autocast kernels for tokenmix ops: one boxed kernel per policy, registered for AutocastCPU and
// AutocastCUDA with one line per op (TM_AUTOCAST). Like torch's own autocast lists, a policy says
// what an op does with the floating-point tensors it is given inside `torch.autocast`:
//
//   kLowerPrecision  every fp32 tensor argument (activations and parameters, tensor lists too) is
//                    cast to the autocast dtype, for ops whose low-precision kernels accumulate
//                    in fp32 (attention, convolutions, GEMM chains). Where the device has no
//                    kernel for that dtype (fp16 on CPU), they run in fp32 instead.
//   kPromote         all floating tensor arguments are cast to the widest of them (fp32 if any is
//                    fp32), for ops that combine several activations into one output.
//   kKeep            nothing is cast: data movement keeps its input dtype, and ops that already
//                    reduce in fp32 and take mixed dtypes run on what they are given.
//
// fp64 tensors are never cast. The casts run above Autograd, so gradients return in each
// argument's own dtype, and fp32 leaf parameters are cast once per autocast region (torch's
// cast cache).
#pragma once

#include <torch/library.h>

namespace tokenmix {

enum class AutocastPolicy { kLowerPrecision, kPromote, kKeep };

torch::CppFunction autocast_kernel(c10::DeviceType device, AutocastPolicy policy);

}  // namespace tokenmix

// Registers op `name` of the tokenmix namespace with `policy` for CPU and CUDA autocast. The
// CUDA registration needs no CUDA build: the dispatch key exists either way.
#define TM_AUTOCAST(name, policy)                                                             \
  TORCH_LIBRARY_IMPL(tokenmix, AutocastCPU, m) {                                              \
    m.impl(name, ::tokenmix::autocast_kernel(c10::DeviceType::CPU,                            \
                                             ::tokenmix::AutocastPolicy::policy));            \
  }                                                                                           \
  TORCH_LIBRARY_IMPL(tokenmix, AutocastCUDA, m) {                                             \
    m.impl(name, ::tokenmix::autocast_kernel(c10::DeviceType::CUDA,                           \
                                             ::tokenmix::AutocastPolicy::policy));            \
  }
