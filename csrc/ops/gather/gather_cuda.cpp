// The CUDA side of the sparse-token gather family, host half: each row primitive fills its
// torch-free parameter struct (gather_params.h) from the tensors and launches the kernels of
// gather_cuda.cu on the current stream. Built only with CUDA.

#include <ATen/ATen.h>

#include "gather_params.h"
#include "gather_problem.h"
#include "tokenmix/checks.h"
#include "tokenmix/cuda_launch.h"

namespace tokenmix {
namespace gather {
namespace {

void gather_rows(const at::Tensor& x, const at::Tensor& index, at::Tensor& out) {
  const GatherParams p{x.const_data_ptr(),           x.stride(0),
                       x.stride(1),                  index.const_data_ptr<int64_t>(),
                       out.mutable_data_ptr(),       index.size(0),
                       x.size(1),                    index.size(1),
                       x.size(2),                    to_dtype(x.scalar_type())};
  check_launch(gather_rows_cuda(p, current_stream()), "gather_rows");
}

// One allocation, no fills: the kernel initialises every entry (in shared memory) and writes it.
Inverse inverse(const at::Tensor& index, int64_t N) {
  const at::Tensor both = at::empty({2, index.size(0), N}, index.options().dtype(at::kInt));
  Inverse inv{both[0], both[1]};
  const InverseParams p{index.const_data_ptr<int64_t>(), inv.count.mutable_data_ptr<int32_t>(),
                        inv.first.mutable_data_ptr<int32_t>(), index.size(0), N, index.size(1)};
  check_launch(build_inverse_cuda(p, current_stream()), "build_inverse");
  return inv;
}

void compose(RowMode mode, const at::Tensor& rows, const at::Tensor& self, const at::Tensor& index,
             const Inverse& inv, at::Tensor& out) {
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

void topk_index(const at::Tensor& score, int64_t k, int64_t keep_first, at::Tensor& index) {
  const TopkParams p{score.const_data_ptr(), score.stride(0), index.mutable_data_ptr<int64_t>(),
                     score.size(0), score.size(1), k, keep_first, to_dtype(score.scalar_type())};
  check_launch(topk_index_cuda(p, current_stream()), "topk_index");
}

// The fields both directions share.
PolicySoftmaxParams policy_params(const at::Tensor& logits, const at::Tensor& policy, double eps) {
  PolicySoftmaxParams p{};
  p.logits = logits.const_data_ptr();
  p.policy = policy.const_data_ptr();
  p.B = logits.size(0);
  p.H = logits.size(1);
  p.N = logits.size(2);
  p.eps = eps;
  p.dtype = to_dtype(logits.scalar_type());
  return p;
}

void policy_forward(const at::Tensor& logits, const at::Tensor& policy, double eps,
                    at::Tensor& out) {
  PolicySoftmaxParams p = policy_params(logits, policy, eps);
  p.out = out.mutable_data_ptr();
  check_launch(policy_softmax_forward_cuda(p, current_stream()), "policy_softmax");
}

// The policy gradient goes through per-chunk partials, summed in a fixed order by the kernels.
void policy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& policy,
                     double eps, at::Tensor& grad_logits, at::Tensor& grad_policy) {
  const int64_t B = logits.size(0), H = logits.size(1), N = logits.size(2);
  const int64_t chunks = (N + kPolicyRowsPerChunk - 1) / kPolicyRowsPerChunk;
  const auto acc = acc_scalar_type(logits.scalar_type());
  at::Tensor partial = at::empty({B, H, chunks, N}, logits.options().dtype(acc));
  PolicySoftmaxParams p = policy_params(logits, policy, eps);
  p.grad_out = grad.const_data_ptr();
  p.out = grad_logits.mutable_data_ptr();
  p.grad_policy = grad_policy.mutable_data_ptr();
  p.partial = partial.mutable_data_ptr();
  check_launch(policy_softmax_backward_cuda(p, current_stream()), "policy_softmax_backward");
}

}  // namespace

TM_DEFINE_KERNELS(gather_cuda_kernels, &gather_rows, &inverse, &compose, &topk_index,
                  &policy_forward, &policy_backward)

}  // namespace gather
}  // namespace tokenmix
