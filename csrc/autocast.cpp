#include "tokenmix/autocast.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace tokenmix {
namespace {

bool low_precision_supported(c10::DeviceType device, at::ScalarType t) {
  // The CPU kernels cover bf16 but not fp16; the CUDA kernels cover both.
  return t == at::kBFloat16 || (t == at::kHalf && device == c10::DeviceType::CUDA);
}

template <class F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) {
      f(t);
    }
  }
}

c10::IValue cast_value(const c10::IValue& v, at::ScalarType to, c10::DeviceType device) {
  if (v.isTensor()) {
    return at::autocast::cached_cast(to, v.toTensor(), device);
  }
  if (v.isTensorList()) {
    c10::List<at::Tensor> out;
    for (const at::Tensor& t : v.toTensorList()) {
      out.push_back(at::autocast::cached_cast(to, t, device));
    }
    return out;
  }
  return v;
}

// The dtype a policy casts this call's eligible tensors to (Undefined: leave them as they are).
at::ScalarType target_dtype(c10::DeviceType device, AutocastPolicy policy,
                            c10::ArrayRef<c10::IValue> args) {
  const at::ScalarType low = at::autocast::get_autocast_dtype(device);
  switch (policy) {
    case AutocastPolicy::kLowerPrecision:
      return low_precision_supported(device, low) ? low : at::kFloat;
    case AutocastPolicy::kPromote: {
      bool any_fp32 = false;
      for (const c10::IValue& v : args) {
        for_each_tensor(v, [&](const at::Tensor& t) {
          any_fp32 |= at::autocast::is_eligible(t, device) && t.scalar_type() == at::kFloat;
        });
      }
      return any_fp32 || !low_precision_supported(device, low) ? at::kFloat : low;
    }
    case AutocastPolicy::kKeep:
      return at::ScalarType::Undefined;
  }
  return at::ScalarType::Undefined;
}

template <c10::DeviceType Device, AutocastPolicy Policy>
void autocast_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet,
                    torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const size_t n = op.schema().arguments().size();
  const auto args = torch::jit::last(*stack, n);
  const at::ScalarType to = target_dtype(Device, Policy, args);
  if (to != at::ScalarType::Undefined) {
    const size_t first = stack->size() - n;
    for (size_t i = first; i < stack->size(); ++i) {
      (*stack)[i] = cast_value((*stack)[i], to, Device);
    }
  }
  op.callBoxed(stack);
}

template <c10::DeviceType Device>
torch::CppFunction kernel_for(AutocastPolicy policy) {
  switch (policy) {
    case AutocastPolicy::kLowerPrecision:
      return torch::CppFunction::makeFromBoxedFunction<
          &autocast_boxed<Device, AutocastPolicy::kLowerPrecision>>();
    case AutocastPolicy::kPromote:
      return torch::CppFunction::makeFromBoxedFunction<
          &autocast_boxed<Device, AutocastPolicy::kPromote>>();
    case AutocastPolicy::kKeep:
      break;
  }
  return torch::CppFunction::makeFromBoxedFunction<&autocast_boxed<Device, AutocastPolicy::kKeep>>();
}

}  // namespace

torch::CppFunction autocast_kernel(c10::DeviceType device, AutocastPolicy policy) {
  return device == c10::DeviceType::CUDA ? kernel_for<c10::DeviceType::CUDA>(policy)
                                         : kernel_for<c10::DeviceType::CPU>(policy);
}

}  // namespace tokenmix
