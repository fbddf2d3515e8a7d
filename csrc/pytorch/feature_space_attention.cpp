// Feature-space local attention ops (BOAT FSLA): schemas and input checks.
//   bhc_cluster: balanced hierarchical clustering -> (perm, inv_perm), int64 [B, heads, N].
//   clustered_attention_forward: gather + sibling overlap + attention + scatter -> (out, lse).
//   clustered_attention_backward: gradients w.r.t. query, key, value (recomputed from lse).
// Fake kernels and the autograd formula are registered in mmboat/ops/feature_space_attention.py.
#include "feature_space_attention.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <cmath>

#include "checks.h"

namespace mmboat {
namespace fsla {

void check_cluster_inputs(const at::Tensor& x, int64_t cluster_size, int64_t iters, double tau) {
  MMBOAT_CHECK_DEFINED(x);
  TORCH_CHECK(x.dim() == 4, "bhc_cluster: x must have 4 dimensions [B, heads, N, d], got shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "bhc_cluster: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1,
              "bhc_cluster: x must have at least one token and one channel, got shape ",
              x.sizes());
  TORCH_CHECK(cluster_size >= 1, "bhc_cluster: cluster_size must be >= 1, got ", cluster_size);
  TORCH_CHECK(iters >= 0, "bhc_cluster: iters must be >= 0, got ", iters);
  TORCH_CHECK(std::isfinite(tau), "bhc_cluster: tau must be finite, got ", tau);
}

static void check_features(const char* op, const char* name, const at::Tensor& t,
                           const at::Tensor& query) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dimensions [B, heads, N, d], got shape ",
              t.sizes());
  TORCH_CHECK(t.sizes() == query.sizes(), op, ": ", name, " must have the shape of query ",
              query.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": query and ", name,
              " must have the same dtype, got ", query.scalar_type(), " and ", t.scalar_type());
  TORCH_CHECK(t.device() == query.device(), op, ": query and ", name,
              " must be on the same device, got ", query.device(), " and ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_attention_inputs(const char* op, Backend backend, const at::Tensor& query,
                            const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& perm, int64_t cluster_size, int64_t overlap) {
  MMBOAT_CHECK_DEFINED(query);
  const auto st = query.scalar_type();
  if (backend == Backend::kCUDA) {
    TORCH_CHECK(query.device().is_cuda(), op, ": query must be a CUDA tensor, got ",
                query.device());
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                op, ": query must be float32, float64, float16 or bfloat16 on CUDA, got ", st);
  }
  TORCH_CHECK(query.dim() == 4, op, ": query must have 4 dimensions [B, heads, N, d], got shape ",
              query.sizes());
  if (backend == Backend::kCPU)
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op,
                ": query must be float32 or float64, got ", st);
  TORCH_CHECK(query.size(2) >= 1 && query.size(3) >= 1, op,
              ": query must have at least one token and one channel, got shape ", query.sizes());
  check_features(op, "query", query, query);
  check_features(op, "key", key, query);
  check_features(op, "value", value, query);
  MMBOAT_CHECK_DEFINED(perm);
  TORCH_CHECK(perm.scalar_type() == at::kLong, op, ": perm must be int64, got ",
              perm.scalar_type());
  TORCH_CHECK(perm.dim() == 3 && perm.sizes() == query.sizes().slice(0, 3), op,
              ": perm must have shape [B, heads, N] = ", query.sizes().slice(0, 3), ", got ",
              perm.sizes());
  TORCH_CHECK(perm.device() == query.device(), op,
              ": query and perm must be on the same device, got ", query.device(), " and ",
              perm.device());
  TORCH_CHECK(perm.is_contiguous(), op, ": perm must be contiguous");
  TORCH_CHECK(cluster_size >= 1, op, ": cluster_size must be >= 1, got ", cluster_size);
  TORCH_CHECK(overlap >= 0 && overlap < cluster_size, op,
              ": overlap must satisfy 0 <= overlap < cluster_size, got overlap=", overlap,
              " and cluster_size=", cluster_size);
}

void check_attention_backward_inputs(const char* op, Backend backend, const at::Tensor& grad_out,
                                     const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& perm,
                                     const at::Tensor& out, const at::Tensor& logsumexp,
                                     int64_t cluster_size, int64_t overlap) {
  check_attention_inputs(op, backend, query, key, value, perm, cluster_size, overlap);
  check_features(op, "grad_out", grad_out, query);
  check_features(op, "out", out, query);
  TORCH_CHECK(logsumexp.defined() && logsumexp.sizes() == query.sizes().slice(0, 3) &&
                  logsumexp.scalar_type() == query.scalar_type() &&
                  logsumexp.device() == query.device() && logsumexp.is_contiguous(),
              op, ": logsumexp must be a contiguous [B, heads, N] tensor with query's dtype and "
              "device, got shape ", logsumexp.sizes());
}

}  // namespace fsla
}  // namespace mmboat

TORCH_LIBRARY_FRAGMENT(mmboat, m) {
  m.def("bhc_cluster(Tensor x, int cluster_size, int iters, float tau) "
        "-> (Tensor perm, Tensor inv_perm)");
  m.def("clustered_attention_forward(Tensor query, Tensor key, Tensor value, Tensor perm, "
        "int cluster_size, int overlap, float scale) -> (Tensor out, Tensor logsumexp)");
  m.def("clustered_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor perm, Tensor out, Tensor logsumexp, int cluster_size, int overlap, float scale) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

// No derivative of the backward op: a second backward through it raises (see the
// neighborhood-attention ops).
TORCH_LIBRARY_IMPL(mmboat, Autograd, m) {
  m.impl("clustered_attention_backward", torch::autograd::autogradNotImplementedFallback());
}
