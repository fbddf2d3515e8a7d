// CUDA launchers of the neighborhood-attention ops (schemas: csrc/pytorch/
// neighborhood_attention.cpp). Argument checks are the shared ones of
// neighborhood_attention_checks.h plus the CUDA-only ones here (device, dtype); the kernels are
// the torch-free templates of csrc/common/cuda/neighborhood_attention_kernels.cuh.
//
// CUDA specifics: float32, float16 and bfloat16 (float32 accumulation, float32 log-sum-exp) and
// float64 (float64 accumulation and log-sum-exp, as on CPU: float64 gradcheck runs on a GPU);
// grad_rpb is accumulated with float32 (float64 for float64) atomics, so it is not
// bit-deterministic on CUDA (dq/dk/dv are: each element is written by one thread).
#include "cuda/pytorch_cuda_helper.h"  // first: torch, with nvcc's C++20 warnings silenced

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/neighborhood_attention_kernels.cuh"
#include "neighborhood_attention_checks.h"

namespace mmboat {
namespace na {
namespace {

namespace kern = ::mmboat::cuda::na;

using cuda_launch::check_cuda_floating;
using cuda_launch::launch_for_dtype;
using cuda_launch::ptr;

kern::Problem to_problem(const Shape3d& s, double scale, const char* op) {
  TORCH_CHECK(s.batch * s.heads < (int64_t(1) << 31), op, ": batch * heads too large");
  TORCH_CHECK(s.dim < (int64_t(1) << 20), op, ": head_dim too large");
  kern::Problem p;
  p.batch = int(s.batch);
  p.heads = int(s.heads);
  p.head_dim = int(s.dim);
  for (int a = 0; a < 3; ++a) {
    p.length[a] = int(s.size[a]);
    p.kernel[a] = s.kernel[a];
    p.dilation[a] = s.dilation[a];
    p.causal[a] = s.causal[a] ? 1 : 0;
  }
  p.set_scale(scale);
  p.has_rpb = s.has_rpb ? 1 : 0;
  return p;
}

// Shared memory the fused forward may use: up to 64 KiB (occupancy), more only if needed.
size_t smem_budget(const at::Tensor& t, const kern::Problem& p, size_t elem_size,
                   size_t acc_size) {
  const size_t optin = cuda_launch::smem_optin(t);
  const size_t preferred = std::min<size_t>(optin, 64 * 1024);
  kern::ForwardTiling tiling;
  if (kern::make_forward_tiling(p, elem_size, preferred, false, &tiling, acc_size) == nullptr)
    return preferred;
  return optin;
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cuda(int nd, const at::Tensor& query,
                                                      const at::Tensor& key,
                                                      const at::Tensor& value,
                                                      const c10::optional<at::Tensor>& rpb_opt,
                                                      at::IntArrayRef kernel_size,
                                                      at::IntArrayRef dilation,
                                                      const c10::List<bool>& is_causal,
                                                      double scale) {
  const char* op = fused_name(nd, false);
  const Shape3d s = check_fused_forward(op, nd, query, key, value, rpb_opt, kernel_size,
                                        dilation, is_causal);
  check_cuda_floating(query, op, "query");
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, query.dim() - 1),
                             query.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() == 0) return {out, lse};
  const kern::Problem p = to_problem(s, scale, op);
  launch_for_dtype(query.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = kern::acc_t<T>;
    return kern::launch_fused_forward<T>(
        p, ptr<T>(query), ptr<T>(key), ptr<T>(value), ptr<T>(rpb), ptr<T>(out), ptr<A>(lse),
        smem_budget(query, p, sizeof(T), sizeof(A)), stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> fused_backward_cuda(
    int nd, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& rpb_opt, const at::Tensor& out,
    const at::Tensor& logsumexp, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    const c10::List<bool>& is_causal, double scale) {
  const char* op = fused_name(nd, true);
  const Shape3d s = check_fused_backward(op, nd, grad_out, query, key, value, rpb_opt, out,
                                         logsumexp, kernel_size, dilation, is_causal);
  check_cuda_floating(query, op, "query");
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_rpb_acc;
  if (s.has_rpb)
    grad_rpb_acc = at::zeros(rpb.sizes(), rpb.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() > 0) {
    at::Tensor delta = at::empty_like(logsumexp);
    const kern::Problem p = to_problem(s, scale, op);
    launch_for_dtype(query.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = kern::acc_t<T>;
      return kern::launch_fused_backward<T>(
          p, ptr<T>(grad_out), ptr<T>(query), ptr<T>(key), ptr<T>(value), ptr<T>(rpb),
          ptr<T>(out), ptr<A>(logsumexp), ptr<A>(delta), ptr<T>(grad_query), ptr<T>(grad_key),
          ptr<T>(grad_value), ptr<A>(grad_rpb_acc), stream);
    });
  }
  c10::optional<at::Tensor> grad_rpb;
  if (s.has_rpb) grad_rpb = grad_rpb_acc.to(rpb.scalar_type());
  return {grad_query, grad_key, grad_value, grad_rpb};
}

at::Tensor qk_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                           const c10::optional<at::Tensor>& rpb_opt, at::IntArrayRef kernel_size,
                           at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk";
  const Shape3d s = check_qk(query, key, rpb_opt, kernel_size, dilation, is_causal);
  check_cuda_floating(query, op, "query");
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor attn = at::empty(attn_shape(query, s), query.options());
  if (attn.numel() == 0) return attn;
  const kern::Problem p = to_problem(s, 1.0, op);
  launch_for_dtype(query.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return kern::launch_qk<T>(p, ptr<T>(query), ptr<T>(key), ptr<T>(rpb), ptr<T>(attn), stream);
  });
  return attn;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qk_backward_cuda(
    const at::Tensor& grad_attn, const at::Tensor& query, const at::Tensor& key, bool has_rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk_backward";
  const Shape3d s =
      check_qk_backward(grad_attn, query, key, has_rpb, kernel_size, dilation, is_causal);
  check_cuda_floating(query, op, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_rpb_acc;
  if (has_rpb)
    grad_rpb_acc = at::zeros({s.heads, s.bias_extent(1), s.bias_extent(2)},
                             query.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() > 0) {
    const kern::Problem p = to_problem(s, 1.0, op);
    launch_for_dtype(query.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return kern::launch_qk_backward<T>(p, ptr<T>(grad_attn), ptr<T>(query), ptr<T>(key),
                                         ptr<T>(grad_query), ptr<T>(grad_key),
                                         ptr<kern::acc_t<T>>(grad_rpb_acc), stream);
    });
  }
  c10::optional<at::Tensor> grad_rpb;
  if (has_rpb) grad_rpb = grad_rpb_acc.to(query.scalar_type());
  return {grad_query, grad_key, grad_rpb};
}

at::Tensor av_forward_cuda(const at::Tensor& attn, const at::Tensor& value,
                           at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                           const c10::List<bool>& is_causal) {
  const char* op = "na2d_av";
  const Shape3d s = check_av(op, attn, value, kernel_size, dilation, is_causal);
  check_cuda_floating(value, op, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty_like(value);
  if (out.numel() == 0) return out;
  const kern::Problem p = to_problem(s, 1.0, op);
  launch_for_dtype(value.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return kern::launch_av<T>(p, ptr<T>(attn), ptr<T>(value), ptr<T>(out), stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> av_backward_cuda(const at::Tensor& grad_out,
                                                    const at::Tensor& attn,
                                                    const at::Tensor& value,
                                                    at::IntArrayRef kernel_size,
                                                    at::IntArrayRef dilation,
                                                    const c10::List<bool>& is_causal) {
  const char* op = "na2d_av_backward";
  const Shape3d s = check_av_backward(grad_out, attn, value, kernel_size, dilation, is_causal);
  check_cuda_floating(value, op, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_attn = at::empty_like(attn);
  at::Tensor grad_value = at::empty_like(value);
  if (value.numel() > 0) {
    const kern::Problem p = to_problem(s, 1.0, op);
    launch_for_dtype(value.scalar_type(), op, [&](auto* tag, cudaStream_t stream) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return kern::launch_av_backward<T>(p, ptr<T>(grad_out), ptr<T>(attn), ptr<T>(value),
                                         ptr<T>(grad_attn), ptr<T>(grad_value), stream);
    });
  } else {
    grad_attn.zero_();
  }
  return {grad_attn, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmboat, CUDA, m) {
  register_kernels<&fused_forward_cuda, &fused_backward_cuda, &qk_forward_cuda,
                   &qk_backward_cuda, &av_forward_cuda, &av_backward_cuda>(m);
}

}  // namespace na
}  // namespace mmboat
