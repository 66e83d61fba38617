// The tokenmix extension module: the operator namespace (TORCH_LIBRARY) and a minimal Python
// module whose import loads this library, so the schemas and registrations of every op family run.
// Python needs no pybind11 casters: everything is reached through torch.ops.tokenmix.

#include <Python.h>
#include <torch/library.h>

#include "tokenmix/cpu_capability.h"

// The library's schemas are defined by each op family, in a TORCH_LIBRARY_FRAGMENT block of its
// csrc/ops/<op>/<op>.cpp; this block only declares the namespace.
TORCH_LIBRARY(tokenmix, m) {}

#ifndef TOKENMIX_CUDA_ARCHS
#define TOKENMIX_CUDA_ARCHS ""
#endif
#ifndef TOKENMIX_VERSION
#define TOKENMIX_VERSION "0.0.0"
#endif

static struct PyModuleDef tokenmix_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "tokenmix compiled operators", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&tokenmix_module);
  if (mod == nullptr) {
    return nullptr;
  }
#if defined(TOKENMIX_WITH_CUDA)
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
#if defined(TOKENMIX_HAVE_CUTLASS)
  const int with_cutlass = 1;
#else
  const int with_cutlass = 0;
#endif
  if (PyModule_AddIntConstant(mod, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(mod, "with_cutlass", with_cutlass) < 0 ||
      PyModule_AddStringConstant(mod, "cuda_archs", TOKENMIX_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(mod, "version", TOKENMIX_VERSION) < 0 ||
      PyModule_AddStringConstant(mod, "cpu_capability", tokenmix::cpu_capability_name()) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
