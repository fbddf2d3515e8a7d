// CPU launchers of the FSLA ops (BOAT; schemas: ../feature_space_attention.cpp).
//
// Layering (as on CUDA): this file checks the arguments (../feature_space_attention.h), allocates
// the outputs, dispatches on the dtype and hands raw pointers and ATen's thread pool
// (aten_parallel.h) to the torch-free kernels of csrc/common/cpu/: balanced_clustering_kernels.h
// (bhc_cluster, float32 whatever the input dtype) and feature_space_attention_kernels.h
// (clustered_attention_*, float32 and float64).
#include <torch/extension.h>

#include <tuple>

#include "checks.h"
#include "cpu/aten_parallel.h"
#include "cpu/balanced_clustering_kernels.h"
#include "cpu/feature_space_attention_kernels.h"
#include "feature_space_attention.h"

namespace mmboat {
namespace fsla {
namespace {

namespace kern = ::mmboat::cpu::fsla;

std::tuple<at::Tensor, at::Tensor> bhc_cluster_cpu(const at::Tensor& x_in, int64_t cluster_size,
                                                   int64_t iters, double tau) {
  check_cluster_inputs(x_in, cluster_size, iters, tau);
  MMBOAT_CHECK_CPU(x_in);
  // The kernel reads x through its strides (q is usually a view of the qkv projection), as long
  // as each token's features are contiguous; x may alias the caller's tensor: it is never
  // written.
  at::Tensor x = x_in.detach().to(at::kFloat);
  if (x.stride(3) != 1) x = x.contiguous();
  const int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), d = x.size(3);
  at::Tensor perm = at::empty({batch, heads, n}, x.options().dtype(at::kLong));
  at::Tensor inv_perm = at::empty_like(perm);
  kern::bhc_cluster(AtenParallel(), x.data_ptr<float>(), batch, heads, n, d, x.stride(0),
                    x.stride(1), x.stride(2), cluster_size, iters, static_cast<float>(tau),
                    perm.data_ptr<int64_t>(), inv_perm.data_ptr<int64_t>());
  return {perm, inv_perm};
}

void check_permutation(const at::Tensor& perm, const char* op) {
  const int64_t n = perm.size(2), rows = perm.numel() / std::max<int64_t>(n, 1);
  const int64_t bad_row =
      kern::first_non_permutation_row(AtenParallel(), perm.data_ptr<int64_t>(), rows, n);
  TORCH_CHECK(bad_row < 0, op, ": perm must be a permutation of 0..N-1 (N = ", n,
              ") in every [sample, head] row; row ", bad_row, " is not");
}

std::tuple<at::Tensor, at::Tensor> clustered_attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& perm, int64_t cluster_size, int64_t overlap, double scale) {
  const char* op = "clustered_attention_forward";
  check_attention_inputs(op, Backend::kCPU, query, key, value, perm, cluster_size, overlap);
  MMBOAT_CHECK_CPU(query);
  check_permutation(perm, op);
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, 3), query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "clustered_attention_forward_cpu", [&] {
    kern::clustered_attention_forward<scalar_t>(
        AtenParallel(), query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
        value.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), query.size(0) * query.size(1),
        query.size(2), query.size(3), cluster_size, overlap, static_cast<scalar_t>(scale),
        out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clustered_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& perm, const at::Tensor& out,
    const at::Tensor& logsumexp, int64_t cluster_size, int64_t overlap, double scale) {
  const char* op = "clustered_attention_backward";
  check_attention_backward_inputs(op, Backend::kCPU, grad_out, query, key, value, perm, out,
                                  logsumexp, cluster_size, overlap);
  MMBOAT_CHECK_CPU(query);
  check_permutation(perm, op);
  at::Tensor grad_q = at::zeros_like(query);
  at::Tensor grad_k = at::zeros_like(key);
  at::Tensor grad_v = at::zeros_like(value);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "clustered_attention_backward_cpu", [&] {
    kern::clustered_attention_backward<scalar_t>(
        AtenParallel(), grad_out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(),
        key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        logsumexp.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(),
        query.size(0) * query.size(1), query.size(2), query.size(3), cluster_size, overlap,
        static_cast<scalar_t>(scale), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmboat, CPU, m) {
  register_kernels<&bhc_cluster_cpu, &clustered_attention_forward_cpu,
                   &clustered_attention_backward_cpu>(m);
}

}  // namespace fsla
}  // namespace mmboat
