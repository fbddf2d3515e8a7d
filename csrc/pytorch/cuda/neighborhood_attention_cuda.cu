// CUDA launchers of the neighborhood-attention ops (schemas: csrc/pytorch/
// neighborhood_attention.cpp). Argument checks are the shared ones of
// neighborhood_attention_checks.h plus the CUDA-only ones here (device, dtype); the kernels are
// the torch-free templates of csrc/common/cuda/neighborhood_attention_kernels.cuh.
//
// CUDA specifics: float32, float16 and bfloat16 (float32 accumulation, float32 log-sum-exp) and
// float64 (float64 accumulation and log-sum-exp, as on CPU: float64 gradcheck runs on a GPU);
// grad_rpb is accumulated with float32 (float64 for float64) atomics, so it is not
// bit-deterministic on CUDA (dq/dk/dv are: each element is written by one thread).
//
// nvcc in C++20 mode reads `module` in torch's C++ API headers (torch/python.h, pulled in by
// torch/extension.h) as the C++20 keyword and warns (#3189-D) dozens of times; harmless, silenced
// for the torch headers only so that warnings about our own code stand out.
#if defined(__NVCC__)
#pragma nv_diag_suppress 3189
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/neighborhood_attention_kernels.cuh"
#include "neighborhood_attention_checks.h"
#if defined(__NVCC__)
#pragma nv_diag_default 3189
#endif

namespace mmboat {
namespace na {
namespace {

namespace kern = ::mmboat::cuda::na;

void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16 on CUDA, got ", st);
}

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

// Calls f(T*) with the CUDA element type of `st`.
template <typename F>
void dispatch_cuda_type(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kDouble:
      f(static_cast<double*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", st, " on CUDA");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared memory the fused forward may use: up to 64 KiB (occupancy), more only if needed.
size_t smem_budget(const at::Tensor& t, const Shape3d& s, size_t elem_size, size_t acc_size) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        t.device().index()));
  const size_t preferred = std::min<size_t>(size_t(optin), 64 * 1024);
  kern::ForwardTiling tiling;
  kern::Problem p;
  p.head_dim = int(s.dim);
  for (int a = 0; a < 3; ++a) {
    p.length[a] = int(s.size[a]);
    p.kernel[a] = s.kernel[a];
    p.dilation[a] = s.dilation[a];
  }
  if (kern::make_forward_tiling(p, elem_size, preferred, false, &tiling, acc_size) == nullptr)
    return preferred;
  return size_t(optin);
}

const char* fused_name(int nd, bool backward) {
  static const char* names[2][3] = {{"na1d_forward", "na2d_forward", "na3d_forward"},
                                    {"na1d_backward", "na2d_backward", "na3d_backward"}};
  return names[backward ? 1 : 0][nd - 1];
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
  check_cuda_tensor(query, op, "query");
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, query.dim() - 1),
                             query.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() == 0) return {out, lse};
  const kern::Problem p = to_problem(s, scale, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_type(query.scalar_type(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = kern::acc_t<T>;
    const char* err = kern::launch_fused_forward<T>(
        p, ptr<T>(query), ptr<T>(key), ptr<T>(value), ptr<T>(rpb), ptr<T>(out), ptr<A>(lse),
        smem_budget(query, s, sizeof(T), sizeof(A)), stream);
    check_launch(err, op);
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
  check_cuda_tensor(query, op, "query");
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
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_cuda_type(query.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = kern::acc_t<T>;
      const char* err = kern::launch_fused_backward<T>(
          p, ptr<T>(grad_out), ptr<T>(query), ptr<T>(key), ptr<T>(value), ptr<T>(rpb),
          ptr<T>(out), ptr<A>(logsumexp), ptr<A>(delta), ptr<T>(grad_query), ptr<T>(grad_key),
          ptr<T>(grad_value), ptr<A>(grad_rpb_acc), stream);
      check_launch(err, op);
    });
  }
  c10::optional<at::Tensor> grad_rpb;
  if (s.has_rpb) grad_rpb = grad_rpb_acc.to(rpb.scalar_type());
  return {grad_query, grad_key, grad_value, grad_rpb};
}

template <int ND>
std::tuple<at::Tensor, at::Tensor> forward_nd_cuda(const at::Tensor& query,
                                                   const at::Tensor& key,
                                                   const at::Tensor& value,
                                                   const c10::optional<at::Tensor>& rpb,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef dilation,
                                                   const c10::List<bool>& is_causal,
                                                   double scale) {
  return fused_forward_cuda(ND, query, key, value, rpb, kernel_size, dilation, is_causal,
                            scale);
}

template <int ND>
std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> backward_nd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& logsumexp, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    const c10::List<bool>& is_causal, double scale) {
  return fused_backward_cuda(ND, grad_out, query, key, value, rpb, out, logsumexp, kernel_size,
                             dilation, is_causal, scale);
}

std::vector<int64_t> attn_shape(const at::Tensor& like, const Shape3d& s) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end() - 1);
  shape.push_back(s.slots());
  return shape;
}

at::Tensor qk_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                           const c10::optional<at::Tensor>& rpb_opt, at::IntArrayRef kernel_size,
                           at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk";
  const bool has_rpb = rpb_opt.has_value() && rpb_opt->defined();
  const Shape3d s = check_config(query, op, "query", 2, kernel_size, dilation, is_causal,
                                 has_rpb);
  check_like(query, key, op, "query", "key");
  if (has_rpb) check_rpb(*rpb_opt, query, s, 2, op);
  check_cuda_tensor(query, op, "query");
  const at::Tensor rpb = has_rpb ? *rpb_opt : at::Tensor();
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor attn = at::empty(attn_shape(query, s), query.options());
  if (attn.numel() == 0) return attn;
  const kern::Problem p = to_problem(s, 1.0, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_type(query.scalar_type(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(kern::launch_qk<T>(p, ptr<T>(query), ptr<T>(key), ptr<T>(rpb), ptr<T>(attn),
                                    stream),
                 op);
  });
  return attn;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qk_backward_cuda(
    const at::Tensor& grad_attn, const at::Tensor& query, const at::Tensor& key, bool has_rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk_backward";
  const Shape3d s = check_config(query, op, "query", 2, kernel_size, dilation, is_causal,
                                 has_rpb);
  check_like(query, key, op, "query", "key");
  check_attn(op, grad_attn, query, s);
  check_cuda_tensor(query, op, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_rpb_acc;
  if (has_rpb)
    grad_rpb_acc = at::zeros({s.heads, s.bias_extent(1), s.bias_extent(2)},
                             query.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() > 0) {
    const kern::Problem p = to_problem(s, 1.0, op);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_cuda_type(query.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      check_launch(kern::launch_qk_backward<T>(p, ptr<T>(grad_attn), ptr<T>(query), ptr<T>(key),
                                               ptr<T>(grad_query), ptr<T>(grad_key),
                                               ptr<kern::acc_t<T>>(grad_rpb_acc), stream),
                   op);
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
  const Shape3d s = check_config(value, op, "value", 2, kernel_size, dilation, is_causal,
                                 false);
  check_attn(op, attn, value, s);
  check_cuda_tensor(value, op, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty_like(value);
  if (out.numel() == 0) return out;
  const kern::Problem p = to_problem(s, 1.0, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_type(value.scalar_type(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(kern::launch_av<T>(p, ptr<T>(attn), ptr<T>(value), ptr<T>(out), stream), op);
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
  const Shape3d s = check_config(value, op, "value", 2, kernel_size, dilation, is_causal,
                                 false);
  check_attn(op, attn, value, s);
  check_like(value, grad_out, op, "value", "grad_out");
  check_cuda_tensor(value, op, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_attn = at::empty_like(attn);
  at::Tensor grad_value = at::empty_like(value);
  if (value.numel() > 0) {
    const kern::Problem p = to_problem(s, 1.0, op);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_cuda_type(value.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      check_launch(kern::launch_av_backward<T>(p, ptr<T>(grad_out), ptr<T>(attn), ptr<T>(value),
                                               ptr<T>(grad_attn), ptr<T>(grad_value), stream),
                   op);
    });
  } else {
    grad_attn.zero_();
  }
  return {grad_attn, grad_value};
}

}  // namespace
}  // namespace na
}  // namespace mmboat

TORCH_LIBRARY_IMPL(mmboat, CUDA, m) {
  using namespace mmboat::na;
  m.impl("na1d_forward", &forward_nd_cuda<1>);
  m.impl("na2d_forward", &forward_nd_cuda<2>);
  m.impl("na3d_forward", &forward_nd_cuda<3>);
  m.impl("na1d_backward", &backward_nd_cuda<1>);
  m.impl("na2d_backward", &backward_nd_cuda<2>);
  m.impl("na3d_backward", &backward_nd_cuda<3>);
  m.impl("na2d_qk", &qk_forward_cuda);
  m.impl("na2d_qk_backward", &qk_backward_cuda);
  m.impl("na2d_av", &av_forward_cuda);
  m.impl("na2d_av_backward", &av_backward_cuda);
}
