// Helpers for the C++ autograd of tokenmix ops. Each differentiable op has a
// torch::autograd::Function whose forward calls the op itself below the Autograd key and whose
// backward calls the op's backward op; both reach them through op_handle, so that autocast, the
// device kernels and torch.compile's fake kernels all see the same dispatcher calls.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <cstddef>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace tokenmix {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed handle of the tokenmix operator `name`, called with signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The handle of op `name` with the signature of its own kernel Kernel, looked up on first use,
// e.g. op_of<backward_impl<c10::kCPU>>("tokenmix::gnconv_backward").call(...).
template <auto& Kernel>
const auto& op_of(const char* name) {
  using Sig = std::remove_reference_t<decltype(Kernel)>;
  static const c10::TypedOperatorHandle<Sig> op = op_handle<Sig>(name);
  return op;
}

// An optional tensor argument as save_for_backward keeps it (undefined when absent), and back.
inline at::Tensor saved_optional(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}
inline std::optional<at::Tensor> restored_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient of an optional input: undefined where the input was not given.
inline at::Tensor grad_if(bool given, const at::Tensor& grad) {
  return given ? grad : at::Tensor();
}

namespace detail {
template <class Tuple, size_t... I>
Tuple tuple_from(const variable_list& v, std::index_sequence<I...>) {
  return Tuple(v[I]...);
}
}  // namespace detail

// The Autograd kernel of an op implemented by the autograd::Function Fn: Fn::apply, taking the
// arguments of Fn::forward after its context. It returns what Fn::forward returns, or Ret: the
// tuple of tensors the schema returns where Fn::forward returns them as a variable_list.
template <class Fn, class Ret = void, class Forward = decltype(&Fn::forward)>
struct AutogradKernel;

template <class Fn, class Ret, class R, class... Args>
struct AutogradKernel<Fn, Ret, R (*)(AutogradContext*, Args...)> {
  using Out = std::conditional_t<std::is_void_v<Ret>, R, Ret>;
  static Out call(Args... args) {
    if constexpr (std::is_same_v<Out, R>) {
      return Fn::apply(args...);
    } else {
      return detail::tuple_from<Out>(Fn::apply(args...),
                                     std::make_index_sequence<std::tuple_size_v<Out>>());
    }
  }
};

}  // namespace tokenmix
