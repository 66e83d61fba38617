// Typed handle of a tokenmix operator, for the C++ autograd kernels that call the op (or its
// backward op) below the Autograd key.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace tokenmix {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace tokenmix
