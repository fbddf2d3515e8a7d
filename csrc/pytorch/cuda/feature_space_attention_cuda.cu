// CUDA launchers of the FSLA ops (schemas: csrc/pytorch/feature_space_attention.cpp); kernels:
// the torch-free templates of csrc/common/cuda/feature_space_attention_kernels.cuh.
//
// CUDA specifics: bhc_cluster takes any floating dtype and computes in float32 (as on CPU).
// clustered_attention_* take float32, float16 and bfloat16 (float32 accumulation) and float64
// (float64 accumulation, as on CPU: float64 gradcheck runs on a GPU): the shared checks of
// csrc/pytorch/feature_space_attention.cpp with Backend::kCUDA. logsumexp has query's dtype (as the schema's fake
// kernel says); the backward recomputes the softmax normaliser from the logits, so a
// float16/bfloat16 logsumexp costs no gradient precision. perm is checked to be a permutation
// per row on the device (one sort and a host sync), since a bad perm would read out of bounds.
#include "cuda/pytorch_cuda_helper.h"  // first: torch, with nvcc's C++20 warnings silenced

#include <tuple>
#include <type_traits>

#include "cuda/feature_space_attention_kernels.cuh"
#include "feature_space_attention.h"

namespace mmboat {
namespace fsla {
namespace {

namespace kern = ::mmboat::cuda::fsla;

using cuda_launch::check_launch;
using cuda_launch::launch_for_dtype;
using cuda_launch::ptr;
using cuda_launch::smem_optin;

// Every row of perm must be a permutation of 0..N-1 (else out-of-range reads).
void check_permutation(const at::Tensor& perm, const char* op) {
  if (perm.numel() == 0) return;
  const int64_t n = perm.size(2);
  const at::Tensor sorted = std::get<0>(perm.sort(-1));
  const bool ok = sorted.eq(at::arange(n, perm.options())).all().item<bool>();
  TORCH_CHECK(ok, op, ": perm must be a permutation of 0..N-1 (N = ", n,
              ") in every [sample, head] row");
}

kern::AttnProblem to_problem(const at::Tensor& query, int64_t cluster_size, int64_t overlap,
                             double scale) {
  return kern::make_attn_problem(query.size(0) * query.size(1), query.size(2), query.size(3),
                                 cluster_size, overlap, scale);
}

std::tuple<at::Tensor, at::Tensor> bhc_cluster_cuda(const at::Tensor& x_in, int64_t cluster_size,
                                                    int64_t iters, double tau) {
  check_cluster_inputs(x_in, cluster_size, iters, tau);
  MMBOAT_CHECK_CUDA(x_in);
  TORCH_CHECK(iters <= (int64_t(1) << 30), "bhc_cluster: iters too large, got ", iters);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.detach().to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), d = x.size(3);
  const int64_t rows = batch * heads;
  at::Tensor perm = at::empty({batch, heads, n}, x.options().dtype(at::kLong));
  at::Tensor inv_perm = at::empty_like(perm);
  if (perm.numel() == 0) return {perm, inv_perm};
  at::Tensor fscratch = at::empty({kern::bhc_float_scratch(rows, n, d)}, x.options());
  at::Tensor kscratch =
      at::empty({kern::bhc_key_scratch_bytes(rows, n) / 8}, x.options().dtype(at::kLong));
  at::Tensor tscratch = at::empty({rows * n}, x.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const char* err = kern::launch_bhc_cluster(
      x.data_ptr<float>(), rows, n, d, cluster_size, static_cast<int>(iters),
      static_cast<float>(tau), fscratch.data_ptr<float>(), kscratch.data_ptr(),
      tscratch.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), inv_perm.data_ptr<int64_t>(),
      stream);
  check_launch(err, "bhc_cluster");
  return {perm, inv_perm};
}

std::tuple<at::Tensor, at::Tensor> clustered_attention_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& perm, int64_t cluster_size, int64_t overlap, double scale) {
  const char* op = "clustered_attention_forward";
  check_attention_inputs(op, Backend::kCUDA, query, key, value, perm, cluster_size, overlap);
  const c10::cuda::CUDAGuard guard(query.device());
  check_permutation(perm, op);
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, 3), query.options());
  if (query.numel() == 0) return {out, lse};
  const kern::AttnProblem p = to_problem(query, cluster_size, overlap, scale);
  const size_t limit = smem_optin(query);
  launch_for_dtype(query.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return kern::launch_attention_forward<T>(p, ptr<T>(query), ptr<T>(key), ptr<T>(value),
                                             perm.data_ptr<int64_t>(), ptr<T>(out), ptr<T>(lse),
                                             limit, stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clustered_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& perm, const at::Tensor& out,
    const at::Tensor& logsumexp, int64_t cluster_size, int64_t overlap, double scale) {
  const char* op = "clustered_attention_backward";
  check_attention_backward_inputs(op, Backend::kCUDA, grad_out, query, key, value, perm, out,
                                  logsumexp, cluster_size, overlap);
  const c10::cuda::CUDAGuard guard(query.device());
  check_permutation(perm, op);
  at::Tensor grad_q = at::empty_like(query);
  // Accumulation dtype: float32, float64 for float64; when it is query's dtype the kernels
  // accumulate straight into grad_k / grad_v.
  const auto acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool in_place = query.scalar_type() == acc_dtype;
  const auto acc_opts = query.options().dtype(acc_dtype);
  at::Tensor gk_acc = at::zeros(query.sizes(), acc_opts);
  at::Tensor gv_acc = at::zeros(query.sizes(), acc_opts);
  at::Tensor grad_k = in_place ? gk_acc : at::empty_like(key);
  at::Tensor grad_v = in_place ? gv_acc : at::empty_like(value);
  if (query.numel() == 0) return {grad_q, grad_k, grad_v};
  const kern::AttnProblem p = to_problem(query, cluster_size, overlap, scale);
  const size_t limit = smem_optin(query);
  launch_for_dtype(query.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = kern::acc_t<T>;
    return kern::launch_attention_backward<T>(
        p, ptr<T>(grad_out), ptr<T>(query), ptr<T>(key), ptr<T>(value), ptr<T>(out),
        perm.data_ptr<int64_t>(), ptr<T>(grad_q), ptr<A>(gk_acc), ptr<A>(gv_acc), ptr<T>(grad_k),
        ptr<T>(grad_v), limit, stream);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmboat, CUDA, m) {
  register_kernels<&bhc_cluster_cuda, &clustered_attention_forward_cuda,
                   &clustered_attention_backward_cuda>(m);
}

}  // namespace fsla
}  // namespace mmboat
