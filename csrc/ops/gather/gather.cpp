// Sparse-token gather family (DynamicViT): argument checks, each op composed from the row
// primitives of the device's kernel table (gather_problem.h), C++ autograd and the dispatcher
// registrations. Schemas are defined here too.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <climits>

#include "gather_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/env.h"
#include "tokenmix/registration.h"

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
  // .to() keeps a dense non-contiguous layout (a transposed index); the kernels read [B, K] rows.
  return index.scalar_type() == at::kLong ? index.contiguous() : index.to(at::kLong).contiguous();
}

// Whether index values are checked on the host: always on CPU; on CUDA only with
// TOKENMIX_CUDA_CHECK_INDICES=1, because reading them there waits for the device (the kernels check
// them on the device instead, gather_cuda.cu).
template <c10::DeviceType D>
bool host_index_checks() {
  static const bool cuda = env_set("TOKENMIX_CUDA_CHECK_INDICES");
  return D == c10::kCPU || cuda;
}

template <c10::DeviceType D>
void check_range(const char* op, const at::Tensor& index, int64_t upper) {
  if (host_index_checks<D>()) {
    check_index_range(op, "index", index, upper);
  }
}

template <c10::DeviceType D>
void check_unique(const char* op, const at::Tensor& count) {
  if (!host_index_checks<D>() || count.numel() == 0) {
    return;
  }
  // count is the int32 [B, N] of inverse(); on the host it is read in place (a reduction op and
  // .item() would cost more than these ops' small kernels).
  int64_t most = 0;
  if (count.is_cpu()) {
    const int32_t* c = count.const_data_ptr<int32_t>();
    most = *std::max_element(c, c + count.numel());
  } else {
    most = count.max().item<int64_t>();
  }
  TORCH_CHECK_VALUE(most <= 1, "tokenmix.", op,
                    ": index entries must be unique within each row, got a position listed ", most,
                    " times");
}

// ---- ops, composed from the primitives ------------------------------------------------------

template <c10::DeviceType D>
at::Tensor gather_tokens_impl(const at::Tensor& x_in, const at::Tensor& index_in) {
  const c10::DeviceGuard guard(x_in.device());
  const char* op = "gather_tokens";
  check_token_values(op, "x", x_in);
  check_index(op, index_in, x_in);
  check_range<D>(op, index_in, x_in.size(1));
  const at::Tensor x = with_unit_channel_stride(as_tokens(x_in));
  const at::Tensor index = index_int64(index_in);
  at::Tensor out = x_in.dim() == 2 ? at::empty({x.size(0), index.size(1)}, x.options())
                                   : at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  if (out.numel() > 0) {
    at::Tensor rows = as_tokens(out);
    kernels<D>().gather_rows(x, index, rows);
  }
  return out;
}

template <c10::DeviceType D>
at::Tensor gather_tokens_backward_impl(const at::Tensor& grad_in, const at::Tensor& index_in,
                                       int64_t num_tokens) {
  const c10::DeviceGuard guard(grad_in.device());
  const char* op = "gather_tokens_backward";
  check_token_values(op, "grad", grad_in);
  check_index(op, index_in, grad_in);
  check_size(op, "grad", grad_in, 1, index_in.size(1), "index.size(1)");
  check_range<D>(op, index_in, num_tokens);
  const at::Tensor grad = as_tokens(grad_in).contiguous();
  const at::Tensor index = index_int64(index_in);
  at::Tensor out = grad_in.dim() == 2
                       ? at::empty({grad.size(0), num_tokens}, grad.options())
                       : at::empty({grad.size(0), num_tokens, grad.size(2)}, grad.options());
  if (out.numel() > 0) {
    at::Tensor rows = as_tokens(out);
    const Inverse inv = kernels<D>().inverse(index, num_tokens);
    kernels<D>().compose(RowMode::GatherBackward, grad, at::Tensor(), index, inv, rows);
  }
  return out;
}

template <c10::DeviceType D>
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
  check_range<D>(op, index_in, x_in.size(1));
  const at::Tensor x = with_unit_channel_stride(x_in);
  const at::Tensor index = index_int64(index_in);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  if (out.numel() > 0) {
    const Inverse inv = kernels<D>().inverse(index, x.size(1));
    check_unique<D>(op, inv.count);
    kernels<D>().compose(RowMode::Scatter, src_in.contiguous(), x, index, inv, out);
  }
  return out;
}

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor> scatter_tokens_backward_impl(const at::Tensor& grad_in,
                                                                const at::Tensor& index_in) {
  const c10::DeviceGuard guard(grad_in.device());
  const char* op = "scatter_tokens_backward";
  check_tokens(op, "grad", grad_in);
  check_index(op, index_in, grad_in);
  check_range<D>(op, index_in, grad_in.size(1));
  const at::Tensor grad = with_unit_channel_stride(grad_in);
  const at::Tensor index = index_int64(index_in);
  at::Tensor grad_x = at::empty(grad.sizes(), grad.options());
  at::Tensor grad_src = at::empty({grad.size(0), index.size(1), grad.size(2)}, grad.options());
  if (grad_x.numel() > 0) {
    const Inverse inv = kernels<D>().inverse(index, grad.size(1));
    kernels<D>().compose(RowMode::ScatterBackward, at::Tensor(), grad, index, inv, grad_x);
  }
  if (grad_src.numel() > 0) {
    kernels<D>().gather_rows(grad, index, grad_src);
  }
  return {grad_x, grad_src};
}

template <c10::DeviceType D>
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
    kernels<D>().topk_index(score, k, keep_first, index);
  }
  if (tokens.numel() > 0) {
    kernels<D>().gather_rows(x, index, tokens);
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

template <c10::DeviceType D>
at::Tensor policy_softmax_impl(const at::Tensor& logits_in, const at::Tensor& policy_in,
                               double eps) {
  const c10::DeviceGuard guard(logits_in.device());
  check_policy("policy_softmax", logits_in, policy_in);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  if (out.numel() > 0) {
    kernels<D>().policy_forward(logits, policy_as(policy_in, logits), eps, out);
  }
  return out;
}

template <c10::DeviceType D>
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
    kernels<D>().policy_backward(grad_in.contiguous(), logits, policy_as(policy_in, logits), eps,
                             grad_logits, grad_policy);
  }
  return {grad_logits, grad_policy.to(policy_in.scalar_type())};
}

// ---- autograd ---------------------------------------------------------------------------------

class GatherTokensFn : public torch::autograd::Function<GatherTokensFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({index});
    ctx->saved_data["num_tokens"] = x.sym_size(1);
    return op_of<gather_tokens_impl<c10::kCPU>>("tokenmix::gather_tokens").call(x, index);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {gather_backward(ctx, grads[0]), at::Tensor()};
  }

  // gather_tokens_backward of grad with the index and token count a forward saved in ctx (the
  // count as the SymInt the schema takes, which the kernel sees as an int64).
  static at::Tensor gather_backward(AutogradContext* ctx, const at::Tensor& grad) {
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt);
    static const auto op = op_handle<Sig>("tokenmix::gather_tokens_backward");
    return op.call(grad, ctx->get_saved_variables()[0], ctx->saved_data["num_tokens"].toSymInt());
  }
};

class ScatterTokensFn : public torch::autograd::Function<ScatterTokensFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index,
                            const at::Tensor& src) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({index});
    return op_of<scatter_tokens_impl<c10::kCPU>>("tokenmix::scatter_tokens").call(x, index, src);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_x, grad_src] =
        op_of<scatter_tokens_backward_impl<c10::kCPU>>("tokenmix::scatter_tokens_backward")
            .call(grads[0], ctx->get_saved_variables()[0]);
    return {grad_x, at::Tensor(), grad_src};
  }
};

class TopkTokensFn : public torch::autograd::Function<TopkTokensFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& score,
                               int64_t k, int64_t keep_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [tokens, index] =
        op_of<topk_tokens_impl<c10::kCPU>>("tokenmix::topk_tokens").call(x, score, k, keep_first);
    ctx->mark_non_differentiable({index});
    ctx->save_for_backward({index});
    ctx->saved_data["num_tokens"] = x.sym_size(1);
    return {tokens, index};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor grad_x =
        grads[0].defined() ? GatherTokensFn::gather_backward(ctx, grads[0]) : at::Tensor();
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class PolicySoftmaxFn : public torch::autograd::Function<PolicySoftmaxFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& policy, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, policy});
    ctx->saved_data["eps"] = eps;
    return op_of<policy_softmax_impl<c10::kCPU>>("tokenmix::policy_softmax")
        .call(logits, policy, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_logits, grad_policy] =
        op_of<policy_softmax_backward_impl<c10::kCPU>>("tokenmix::policy_softmax_backward")
            .call(grads[0], saved[0], saved[1], ctx->saved_data["eps"].toDouble());
    return {grad_logits, grad_policy, at::Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmix, m) {
  def(m, "gather_tokens(Tensor x, Tensor index) -> Tensor");
  def(m, "gather_tokens_backward(Tensor grad, Tensor index, SymInt num_tokens) -> Tensor");
  def(m, "scatter_tokens(Tensor x, Tensor index, Tensor src) -> Tensor");
  def(m, "scatter_tokens_backward(Tensor grad, Tensor index) -> (Tensor, Tensor)");
  def(m, "topk_tokens(Tensor x, Tensor score, int k, *, int keep_first=0) -> (Tensor, Tensor)");
  def(m, "policy_softmax(Tensor logits, Tensor policy, float eps=1e-06) -> Tensor");
  def(m,
      "policy_softmax_backward(Tensor grad, Tensor logits, Tensor policy, float eps) "
      "-> (Tensor, Tensor)");
}

TM_IMPL("gather_tokens", gather_tokens_impl)
TM_IMPL("gather_tokens_backward", gather_tokens_backward_impl)
TM_IMPL("scatter_tokens", scatter_tokens_impl)
TM_IMPL("scatter_tokens_backward", scatter_tokens_backward_impl)
TM_IMPL("topk_tokens", topk_tokens_impl)
TM_IMPL("policy_softmax", policy_softmax_impl)
TM_IMPL("policy_softmax_backward", policy_softmax_backward_impl)

TM_AUTOGRAD("gather_tokens", GatherTokensFn)
TM_AUTOGRAD("scatter_tokens", ScatterTokensFn)
TM_AUTOGRAD("topk_tokens", TopkTokensFn, std::tuple<at::Tensor, at::Tensor>)
TM_AUTOGRAD("policy_softmax", PolicySoftmaxFn)

// Gather, top-k and the policy softmax keep their dtypes (data movement; the softmax reduces in
// fp32 and takes an fp32 policy beside low-precision logits); scatter merges two activations.
TM_AUTOCAST("gather_tokens", kKeep)
TM_AUTOCAST("scatter_tokens", kPromote)
TM_AUTOCAST("topk_tokens", kKeep)
TM_AUTOCAST("policy_softmax", kKeep)

}  // namespace gather
}  // namespace tokenmix
