// The tokenmix extension module: operator schemas (TORCH_LIBRARY) and a minimal Python module
// whose import loads this library, so the dispatcher registrations of every op family run.
// Python needs no pybind11 casters: everything is reached through torch.ops.tokenmix.

#include <Python.h>
#include <torch/library.h>

#include "tokenmix/cpu_capability.h"

TORCH_LIBRARY(tokenmix, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // Sparse-token gather (DynamicViT), csrc/ops/gather.
  m.def("gather_tokens(Tensor x, Tensor index) -> Tensor", tags);
  m.def("gather_tokens_backward(Tensor grad, Tensor index, SymInt num_tokens) -> Tensor", tags);
  m.def("scatter_tokens(Tensor x, Tensor index, Tensor src) -> Tensor", tags);
  m.def("scatter_tokens_backward(Tensor grad, Tensor index) -> (Tensor, Tensor)", tags);
  m.def("topk_tokens(Tensor x, Tensor score, int k, *, int keep_first=0) -> (Tensor, Tensor)",
        tags);
  m.def("policy_softmax(Tensor logits, Tensor policy, float eps=1e-06) -> Tensor", tags);
  m.def(
      "policy_softmax_backward(Tensor grad, Tensor logits, Tensor policy, float eps) "
      "-> (Tensor, Tensor)",
      tags);
  // Windowed attention (Swin, GC ViT, HAT-Net), csrc/ops/window_attention. The public op returns
  // the output; _fwd also returns the row log-sum-exp that backward recomputes P from.
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[2] window_size, int[2] shift_size=[0, 0], "
      "Tensor? bias_table=None, float? scale=None) -> Tensor",
      tags);
  m.def(
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, int[2] window_size, int[2] shift_size, "
      "Tensor? bias_table, float? scale) -> (Tensor, Tensor)",
      tags);
  m.def(
      "window_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "int[2] window_size, int[2] shift_size, Tensor? bias_table, float? scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  // Deformable convolution (LIT, DCNv1/v2), csrc/ops/deform_conv2d. torchvision's signature.
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias=None, "
      "int[2] stride=[1, 1], int[2] padding=[0, 0], int[2] dilation=[1, 1], Tensor? mask=None) "
      "-> Tensor",
      tags);
  m.def(
      "deform_conv2d_backward(Tensor grad, Tensor input, Tensor offset, Tensor weight, "
      "Tensor? mask, int[2] stride, int[2] padding, int[2] dilation, bool bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  // Recursive gated convolution (HorNet's gnConv), csrc/ops/gnconv.
  m.def(
      "gnconv(Tensor x, Tensor proj_in_weight, Tensor proj_in_bias, Tensor dw_weight, "
      "Tensor dw_bias, Tensor[] pw_weights, Tensor[] pw_biases, Tensor proj_out_weight, "
      "Tensor proj_out_bias, *, int order, float scale) -> Tensor",
      tags);
  m.def(
      "gnconv_backward(Tensor grad, Tensor x, Tensor proj_in_weight, Tensor proj_in_bias, "
      "Tensor dw_weight, Tensor dw_bias, Tensor[] pw_weights, Tensor[] pw_biases, "
      "Tensor proj_out_weight, Tensor proj_out_bias, *, int order, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)",
      tags);
}

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
