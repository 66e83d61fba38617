// Sparse-token gather family (DynamicViT): argument checks, the device-independent composition of
// each op from a few row primitives, the CPU and CUDA backends of those primitives, C++ autograd,
// and the dispatcher registrations. Schemas live in csrc/tokenmix.cpp.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <climits>

#include "gather_cpu.h"
#include "tokenmix/autocast.h"
#include "tokenmix/checks.h"
#include "tokenmix/op_handle.h"

#if defined(TOKENMIX_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "gather_params.h"
#include "tokenmix/cuda_launch.h"
#endif

namespace tokenmix {
namespace gather {
namespace {

// ---- checks shared by both devices ------------------------------------------------------------

void check_tokens(const char* op, const char* name, const at::Tensor& x) {
  check_rank(op, name, x, 3, "[B, N, C]");
  check_floating(op, name, x);
}

// Tokens [B, N, C], or [B, N] (one value per token, as DynamicViT's batch_index_select takes).
void check_token_values(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "tokenmix.", op, ": ", name,
                    " must have 3 dimensions [B, N, C] or 2 dimensions [B, N], got ", x.dim(),
                    " (shape ", shape_str(x), ")");
  check_floating(op, name, x);
}

// A [B, N] tensor as [B, N, 1] (a view); [B, N, C] as it is.
at::Tensor as_tokens(const at::Tensor& x) {
  return x.dim() == 2 ? x.unsqueeze(-1) : x;
}

void check_index(const char* op, const at::Tensor& index, const at::Tensor& x) {
  check_rank(op, "index", index, 2, "[B, K]");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "tokenmix.", op, ": index must be int64 or int32, got ", index.scalar_type());
  check_same_device(op, "index", index, "x", x);
  check_size(op, "index", index, 0, x.size(0), "x.size(0)");
  TORCH_CHECK_VALUE(index.size(1) < INT32_MAX, "tokenmix.", op, ": index.size(1) must be below ",
                    INT32_MAX, ", got ", index.size(1));
}

// The kernels read int64 indices; int32 ones are widened (K entries, a negligible copy).
at::Tensor index_int64(const at::Tensor& index) {
  return index.scalar_type() == at::kLong ? index.contiguous() : index.to(at::kLong);
}

void check_unique(const char* op, const at::Tensor& count) {
  if (count.numel() == 0) {
    return;
  }
  const int64_t most = count.max().item<int64_t>();
  TORCH_CHECK_VALUE(most <= 1, "tokenmix.", op,
                    ": index entries must be unique within each row, got a position listed ", most,
                    " times");
}

// ---- backends: the five row primitives on each device --------------------------------------

struct Inverse {
  at::Tensor count, first;
};

struct CpuBackend {
  static void gather_rows(const at::Tensor& x, const at::Tensor& index, at::Tensor& out) {
    gather_cpu_kernels().gather_rows(x, index, out);
  }
  static Inverse inverse(const at::Tensor& index, int64_t N) {
    const auto opts = index.options().dtype(at::kInt);
    Inverse inv{at::empty({index.size(0), N}, opts), at::empty({index.size(0), N}, opts)};
    gather_cpu_kernels().build_inverse(index, inv.count, inv.first);
    return inv;
  }
  static void compose(RowMode mode, const at::Tensor& rows, const at::Tensor& self,
                      const at::Tensor& index, const Inverse& inv, at::Tensor& out) {
    gather_cpu_kernels().compose_rows(mode, rows, self, index, inv.count, inv.first, out);
  }
  static void topk_index(const at::Tensor& score, int64_t k, int64_t keep_first,
                         at::Tensor& index) {
    gather_cpu_kernels().topk_index(score, k, keep_first, index);
  }
  static void policy_forward(const at::Tensor& logits, const at::Tensor& policy, double eps,
                             at::Tensor& out) {
    gather_cpu_kernels().policy_forward(logits, policy, eps, out);
  }
  static void policy_backward(const at::Tensor& grad, const at::Tensor& logits,
                              const at::Tensor& policy, double eps, at::Tensor& grad_logits,
                              at::Tensor& grad_policy) {
    gather_cpu_kernels().policy_backward(grad, logits, policy, eps, grad_logits, grad_policy);
  }
};

#if defined(TOKENMIX_WITH_CUDA)
struct CudaBackend {
  static void gather_rows(const at::Tensor& x, const at::Tensor& index, at::Tensor& out) {
    const GatherParams p{x.const_data_ptr(),           x.stride(0),
                         x.stride(1),                  index.const_data_ptr<int64_t>(),
                         out.mutable_data_ptr(),       index.size(0),
                         x.size(1),                    index.size(1),
                         x.size(2),                    to_dtype(x.scalar_type())};
    check_launch(gather_rows_cuda(p, current_stream()), "gather_rows");
  }
  static Inverse inverse(const at::Tensor& index, int64_t N) {
    const auto opts = index.options().dtype(at::kInt);
    Inverse inv{at::zeros({index.size(0), N}, opts), at::full({index.size(0), N}, kNoEntry, opts)};
    const InverseParams p{index.const_data_ptr<int64_t>(), inv.count.mutable_data_ptr<int32_t>(),
                          inv.first.mutable_data_ptr<int32_t>(), index.size(0), N, index.size(1)};
    check_launch(build_inverse_cuda(p, current_stream()), "build_inverse");
    return inv;
  }
  static void compose(RowMode mode, const at::Tensor& rows, const at::Tensor& self,
                      const at::Tensor& index, const Inverse& inv, at::Tensor& out) {
    const ComposeParams p{mode,
                          rows.defined() ? rows.const_data_ptr() : nullptr,
                          self.defined() ? self.const_data_ptr() : nullptr,
                          self.defined() ? self.stride(0) : 0,
                          self.defined() ? self.stride(1) : 0,
                          index.const_data_ptr<int64_t>(),
                          inv.count.const_data_ptr<int32_t>(),
                          inv.first.const_data_ptr<int32_t>(),
                          out.mutable_data_ptr(),
                          out.size(0),
                          out.size(1),
                          index.size(1),
                          out.size(2),
                          to_dtype(out.scalar_type())};
    check_launch(compose_rows_cuda(p, current_stream()), "compose_rows");
  }
  static void topk_index(const at::Tensor& score, int64_t k, int64_t keep_first,
                         at::Tensor& index) {
    const TopkParams p{score.const_data_ptr(), score.stride(0), index.mutable_data_ptr<int64_t>(),
                       score.size(0), score.size(1), k, keep_first, to_dtype(score.scalar_type())};
    check_launch(topk_index_cuda(p, current_stream()), "topk_index");
  }
  static void policy_forward(const at::Tensor& logits, const at::Tensor& policy, double eps,
                             at::Tensor& out) {
    PolicySoftmaxParams p{};
    p.logits = logits.const_data_ptr();
    p.policy = policy.const_data_ptr();
    p.out = out.mutable_data_ptr();
    p.B = logits.size(0);
    p.H = logits.size(1);
    p.N = logits.size(2);
    p.eps = eps;
    p.dtype = to_dtype(logits.scalar_type());
    check_launch(policy_softmax_forward_cuda(p, current_stream()), "policy_softmax");
  }
  static void policy_backward(const at::Tensor& grad, const at::Tensor& logits,
                              const at::Tensor& policy, double eps, at::Tensor& grad_logits,
                              at::Tensor& grad_policy) {
    const int64_t B = logits.size(0), H = logits.size(1), N = logits.size(2);
    const int64_t chunks = (N + kPolicyRowsPerChunk - 1) / kPolicyRowsPerChunk;
    const auto acc = acc_scalar_type(logits.scalar_type());
    at::Tensor partial = at::empty({B, H, chunks, N}, logits.options().dtype(acc));
    PolicySoftmaxParams p{};
    p.logits = logits.const_data_ptr();
    p.policy = policy.const_data_ptr();
    p.grad_out = grad.const_data_ptr();
    p.out = grad_logits.mutable_data_ptr();
    p.grad_policy = grad_policy.mutable_data_ptr();
    p.partial = partial.mutable_data_ptr();
    p.B = B;
    p.H = H;
    p.N = N;
    p.eps = eps;
    p.dtype = to_dtype(logits.scalar_type());
    check_launch(policy_softmax_backward_cuda(p, current_stream()), "policy_softmax_backward");
  }
};
#endif

// ---- ops, composed from the primitives ------------------------------------------------------

template <class Backend>
at::Tensor gather_tokens_impl(const at::Tensor& x_in, const at::Tensor& index_in) {
  const c10::DeviceGuard guard(x_in.device());
  const char* op = "gather_tokens";
  check_token_values(op, "x", x_in);
  check_index(op, index_in, x_in);
  check_index_range(op, "index", index_in, x_in.size(1));
  const at::Tensor x = with_unit_channel_stride(as_tokens(x_in));
  const at::Tensor index = index_int64(index_in);
  at::Tensor out = x_in.dim() == 2 ? at::empty({x.size(0), index.size(1)}, x.options())
                                   : at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  if (out.numel() > 0) {
    at::Tensor rows = as_tokens(out);
    Backend::gather_rows(x, index, rows);
  }
  return out;
}

template <class Backend>
at::Tensor gather_tokens_backward_impl(const at::Tensor& grad_in, const at::Tensor& index_in,
                                       int64_t num_tokens) {
  const c10::DeviceGuard guard(grad_in.device());
  const char* op = "gather_tokens_backward";
  check_token_values(op, "grad", grad_in);
  check_index(op, index_in, grad_in);
  check_size(op, "grad", grad_in, 1, index_in.size(1), "index.size(1)");
  check_index_range(op, "index", index_in, num_tokens);
  const at::Tensor grad = as_tokens(grad_in).contiguous();
  const at::Tensor index = index_int64(index_in);
  at::Tensor out = grad_in.dim() == 2
                       ? at::empty({grad.size(0), num_tokens}, grad.options())
                       : at::empty({grad.size(0), num_tokens, grad.size(2)}, grad.options());
  if (out.numel() > 0) {
    at::Tensor rows = as_tokens(out);
    const Inverse inv = Backend::inverse(index, num_tokens);
    Backend::compose(RowMode::GatherBackward, grad, at::Tensor(), index, inv, rows);
  }
  return out;
}

template <class Backend>
at::Tensor scatter_tokens_impl(const at::Tensor& x_in, const at::Tensor& index_in,
                               const at::Tensor& src_in) {
  const c10::DeviceGuard guard(x_in.device());
  const char* op = "scatter_tokens";
  check_tokens(op, "x", x_in);
  check_index(op, index_in, x_in);
  check_tokens(op, "src", src_in);
  check_same_device(op, "src", src_in, "x", x_in);
  check_same_dtype(op, "src", src_in, "x", x_in);
  check_size(op, "src", src_in, 0, x_in.size(0), "x.size(0)");
  check_size(op, "src", src_in, 1, index_in.size(1), "index.size(1)");
  check_size(op, "src", src_in, 2, x_in.size(2), "x.size(2)");
  check_index_range(op, "index", index_in, x_in.size(1));
  const at::Tensor x = with_unit_channel_stride(x_in);
  const at::Tensor index = index_int64(index_in);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  if (out.numel() > 0) {
    const Inverse inv = Backend::inverse(index, x.size(1));
    check_unique(op, inv.count);
    Backend::compose(RowMode::Scatter, src_in.contiguous(), x, index, inv, out);
  }
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> scatter_tokens_backward_impl(const at::Tensor& grad_in,
                                                                const at::Tensor& index_in) {
  const c10::DeviceGuard guard(grad_in.device());
  const char* op = "scatter_tokens_backward";
  check_tokens(op, "grad", grad_in);
  check_index(op, index_in, grad_in);
  check_index_range(op, "index", index_in, grad_in.size(1));
  const at::Tensor grad = with_unit_channel_stride(grad_in);
  const at::Tensor index = index_int64(index_in);
  at::Tensor grad_x = at::empty(grad.sizes(), grad.options());
  at::Tensor grad_src = at::empty({grad.size(0), index.size(1), grad.size(2)}, grad.options());
  if (grad_x.numel() > 0) {
    const Inverse inv = Backend::inverse(index, grad.size(1));
    Backend::compose(RowMode::ScatterBackward, at::Tensor(), grad, index, inv, grad_x);
  }
  if (grad_src.numel() > 0) {
    Backend::gather_rows(grad, index, grad_src);
  }
  return {grad_x, grad_src};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> topk_tokens_impl(const at::Tensor& x_in,
                                                    const at::Tensor& score_in, int64_t k,
                                                    int64_t keep_first) {
  const c10::DeviceGuard guard(x_in.device());
  const char* op = "topk_tokens";
  check_tokens(op, "x", x_in);
  check_rank(op, "score", score_in, 2, "[B, N - keep_first]");
  check_floating(op, "score", score_in);
  check_same_device(op, "score", score_in, "x", x_in);
  check_size(op, "score", score_in, 0, x_in.size(0), "x.size(0)");
  const int64_t N = x_in.size(1);
  TORCH_CHECK_VALUE(keep_first >= 0 && keep_first <= N, "tokenmix.", op,
                    ": keep_first must lie in [0, N = ", N, "], got ", keep_first);
  check_size(op, "score", score_in, 1, N - keep_first, "N - keep_first");
  TORCH_CHECK_VALUE(k >= 0 && k <= N - keep_first, "tokenmix.", op, ": k must lie in [0, ",
                    "N - keep_first = ", N - keep_first, "], got ", k);
  const at::Tensor x = with_unit_channel_stride(x_in);
  const at::Tensor score = score_in.contiguous();
  at::Tensor index = at::empty({x.size(0), keep_first + k}, x.options().dtype(at::kLong));
  at::Tensor tokens = at::empty({x.size(0), keep_first + k, x.size(2)}, x.options());
  if (index.numel() > 0) {
    Backend::topk_index(score, k, keep_first, index);
  }
  if (tokens.numel() > 0) {
    Backend::gather_rows(x, index, tokens);
  }
  return {tokens, index};
}

void check_policy(const char* op, const at::Tensor& logits, const at::Tensor& policy) {
  check_rank(op, "logits", logits, 4, "[B, heads, N, N]");
  check_floating(op, "logits", logits);
  check_size(op, "logits", logits, 3, logits.size(2), "logits.size(2)");
  check_rank(op, "policy", policy, 2, "[B, N]");
  check_same_device(op, "policy", policy, "logits", logits);
  check_floating(op, "policy", policy);
  check_size(op, "policy", policy, 0, logits.size(0), "logits.size(0)");
  check_size(op, "policy", policy, 1, logits.size(2), "logits.size(2)");
}

// The kernels read the policy in the logits' dtype. An fp32 policy beside fp16/bf16 logits (what
// autocast produces) is converted here: [B, N] values, negligible next to [B, h, N, N] logits.
at::Tensor policy_as(const at::Tensor& policy, const at::Tensor& logits) {
  return policy.to(logits.scalar_type()).contiguous();
}

template <class Backend>
at::Tensor policy_softmax_impl(const at::Tensor& logits_in, const at::Tensor& policy_in,
                               double eps) {
  const c10::DeviceGuard guard(logits_in.device());
  check_policy("policy_softmax", logits_in, policy_in);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  if (out.numel() > 0) {
    Backend::policy_forward(logits, policy_as(policy_in, logits), eps, out);
  }
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> policy_softmax_backward_impl(const at::Tensor& grad_in,
                                                                const at::Tensor& logits_in,
                                                                const at::Tensor& policy_in,
                                                                double eps) {
  const c10::DeviceGuard guard(logits_in.device());
  const char* op = "policy_softmax_backward";
  check_policy(op, logits_in, policy_in);
  check_same_device(op, "grad", grad_in, "logits", logits_in);
  check_same_dtype(op, "grad", grad_in, "logits", logits_in);
  TORCH_CHECK_VALUE(grad_in.sizes() == logits_in.sizes(), "tokenmix.", op,
                    ": grad must have the shape of logits ", shape_str(logits_in), ", got ",
                    shape_str(grad_in));
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  at::Tensor grad_policy = at::zeros(policy_in.sizes(), logits.options());
  if (grad_logits.numel() > 0) {
    Backend::policy_backward(grad_in.contiguous(), logits, policy_as(policy_in, logits), eps,
                             grad_logits, grad_policy);
  }
  return {grad_logits, grad_policy.to(policy_in.scalar_type())};
}

// ---- autograd ---------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GatherTokensFn : public torch::autograd::Function<GatherTokensFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>(
        "tokenmix::gather_tokens");
    ctx->save_for_backward({index});
    ctx->saved_data["num_tokens"] = x.sym_size(1);
    return op.call(x, index);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
        "tokenmix::gather_tokens_backward");
    const auto saved = ctx->get_saved_variables();
    return {op.call(grads[0], saved[0], ctx->saved_data["num_tokens"].toSymInt()), at::Tensor()};
  }
};

class ScatterTokensFn : public torch::autograd::Function<ScatterTokensFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index,
                            const at::Tensor& src) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "tokenmix::scatter_tokens");
    ctx->save_for_backward({index});
    return op.call(x, index, src);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                                  const at::Tensor&)>(
        "tokenmix::scatter_tokens_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_src] = op.call(grads[0], saved[0]);
    return {grad_x, at::Tensor(), grad_src};
  }
};

class TopkTokensFn : public torch::autograd::Function<TopkTokensFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& score,
                               int64_t k, int64_t keep_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, int64_t, int64_t)>("tokenmix::topk_tokens");
    auto [tokens, index] = op.call(x, score, k, keep_first);
    ctx->mark_non_differentiable({index});
    ctx->save_for_backward({index});
    ctx->saved_data["num_tokens"] = x.sym_size(1);
    return {tokens, index};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
        "tokenmix::gather_tokens_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_x;
    if (grads[0].defined()) {
      grad_x = op.call(grads[0], saved[0], ctx->saved_data["num_tokens"].toSymInt());
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class PolicySoftmaxFn : public torch::autograd::Function<PolicySoftmaxFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& policy, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
        "tokenmix::policy_softmax");
    ctx->save_for_backward({logits, policy});
    ctx->saved_data["eps"] = eps;
    return op.call(logits, policy, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
        "tokenmix::policy_softmax_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_logits, grad_policy] =
        op.call(grads[0], saved[0], saved[1], ctx->saved_data["eps"].toDouble());
    return {grad_logits, grad_policy, at::Tensor()};
  }
};

at::Tensor gather_tokens_autograd(const at::Tensor& x, const at::Tensor& index) {
  return GatherTokensFn::apply(x, index);
}

at::Tensor scatter_tokens_autograd(const at::Tensor& x, const at::Tensor& index,
                                   const at::Tensor& src) {
  return ScatterTokensFn::apply(x, index, src);
}

std::tuple<at::Tensor, at::Tensor> topk_tokens_autograd(const at::Tensor& x,
                                                        const at::Tensor& score, int64_t k,
                                                        int64_t keep_first) {
  auto out = TopkTokensFn::apply(x, score, k, keep_first);
  return {out[0], out[1]};
}

at::Tensor policy_softmax_autograd(const at::Tensor& logits, const at::Tensor& policy,
                                   double eps) {
  return PolicySoftmaxFn::apply(logits, policy, eps);
}

}  // namespace

// ---- registrations ----------------------------------------------------------------------------

#define TM_GATHER_REGISTER(m, Backend)                                                  \
  m.impl("gather_tokens", &gather_tokens_impl<Backend>);                               \
  m.impl("gather_tokens_backward", &gather_tokens_backward_impl<Backend>);             \
  m.impl("scatter_tokens", &scatter_tokens_impl<Backend>);                             \
  m.impl("scatter_tokens_backward", &scatter_tokens_backward_impl<Backend>);           \
  m.impl("topk_tokens", &topk_tokens_impl<Backend>);                                   \
  m.impl("policy_softmax", &policy_softmax_impl<Backend>);                             \
  m.impl("policy_softmax_backward", &policy_softmax_backward_impl<Backend>)

TORCH_LIBRARY_IMPL(tokenmix, CPU, m) {
  TM_GATHER_REGISTER(m, CpuBackend);
}

#if defined(TOKENMIX_WITH_CUDA)
TORCH_LIBRARY_IMPL(tokenmix, CUDA, m) {
  TM_GATHER_REGISTER(m, CudaBackend);
}
#endif

TORCH_LIBRARY_IMPL(tokenmix, Autograd, m) {
  m.impl("gather_tokens", &gather_tokens_autograd);
  m.impl("scatter_tokens", &scatter_tokens_autograd);
  m.impl("topk_tokens", &topk_tokens_autograd);
  m.impl("policy_softmax", &policy_softmax_autograd);
}

// Gather, top-k and the policy softmax keep their dtypes (data movement; the softmax reduces in
// fp32 and takes an fp32 policy beside low-precision logits); scatter merges two activations.
TM_AUTOCAST("gather_tokens", kKeep)
TM_AUTOCAST("scatter_tokens", kPromote)
TM_AUTOCAST("topk_tokens", kKeep)
TM_AUTOCAST("policy_softmax", kKeep)

}  // namespace gather
}  // namespace tokenmix
