// The device-independent half of the neighborhood-attention launchers, shared by the CPU
// (cpu/neighborhood_attention_cpu.cpp) and CUDA (cuda/neighborhood_attention_cuda.cu) ones: the
// argument checks (each failure names the argument and the problem; tests match these
// messages), the output shapes, and the registration of a backend's kernels.
#pragma once
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "neighborhood_attention.h"  // csrc/common: the window rule and Shape3d (torch-free)

namespace mmboat {
namespace na {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_like(const at::Tensor& ref, const at::Tensor& t, const char* op,
                       const char* ref_name, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", ref_name, " and ", name,
              " must have the same shape, got ", ref.sizes(), " and ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", ref_name, " and ", name,
              " must have the same dtype, got ", ref.scalar_type(), " and ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", ref_name, " and ", name,
              " must be on the same device, got ", ref.device(), " and ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Checks query-shaped input `ref` ([B, heads, *spatial, D] with `nd` spatial axes) and the
// window configuration; returns the problem as 3-D.
inline Shape3d check_config(const at::Tensor& ref, const char* op, const char* name, int nd,
                            at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                            const c10::List<bool>& is_causal, bool has_rpb) {
  TORCH_CHECK(ref.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(ref.dim() == nd + 3, op, ": ", name, " must be [B, heads, ", nd,
              " spatial dims, head_dim] (", nd + 3, " dims), got shape ", ref.sizes());
  check_floating(ref, op, name);
  TORCH_CHECK(ref.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(int64_t(kernel_size.size()) == nd, op, ": kernel_size needs ", nd,
              " values, got ", kernel_size);
  TORCH_CHECK(int64_t(dilation.size()) == nd, op, ": dilation needs ", nd, " values, got ",
              dilation);
  TORCH_CHECK(int64_t(is_causal.size()) == nd, op, ": is_causal needs ", nd, " values, got ",
              is_causal.size());
  Shape3d s;
  s.batch = ref.size(0);
  s.heads = ref.size(1);
  s.dim = ref.size(-1);
  TORCH_CHECK(s.dim > 0, op, ": ", name, " has head_dim 0, shape ", ref.sizes());
  bool any_causal = false;
  for (int a = 0; a < nd; ++a) {
    const int ax = 3 - nd + a;
    const int64_t length = ref.size(2 + a);
    TORCH_CHECK(kernel_size[a] >= 1, op, ": kernel_size must be >= 1, got ", kernel_size);
    TORCH_CHECK(dilation[a] >= 1, op, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK(length >= kernel_size[a] * dilation[a], op, ": spatial axis ", a,
                " has size ", length, ", smaller than kernel_size * dilation = ",
                kernel_size[a], " * ", dilation[a], " = ", kernel_size[a] * dilation[a]);
    TORCH_CHECK(length < (int64_t(1) << 30), op, ": spatial axis ", a, " too long");
    TORCH_CHECK(!has_rpb || kernel_size[a] % 2 == 1, op, ": an even kernel_size ", kernel_size,
                " is only supported without rpb");
    s.size[ax] = length;
    s.kernel[ax] = int(kernel_size[a]);
    s.dilation[ax] = int(dilation[a]);
    s.causal[ax] = is_causal.get(a);
    any_causal = any_causal || is_causal.get(a);
  }
  TORCH_CHECK(!(has_rpb && any_causal), op, ": is_causal cannot be combined with rpb");
  s.has_rpb = has_rpb;
  return s;
}

inline void check_rpb(const at::Tensor& rpb, const at::Tensor& ref, const Shape3d& s, int nd,
                      const char* op) {
  std::vector<int64_t> expected{s.heads};
  for (int a = 3 - nd; a < 3; ++a) expected.push_back(s.bias_extent(a));
  TORCH_CHECK(rpb.sizes() == at::IntArrayRef(expected), op,
              ": rpb must have shape (heads, 2k-1 per axis) = ", at::IntArrayRef(expected),
              ", got ", rpb.sizes());
  TORCH_CHECK(rpb.scalar_type() == ref.scalar_type(), op, ": rpb dtype ", rpb.scalar_type(),
              " differs from query dtype ", ref.scalar_type());
  TORCH_CHECK(rpb.device() == ref.device(), op, ": rpb is on ", rpb.device(), ", query on ",
              ref.device());
  TORCH_CHECK(rpb.is_contiguous(), op, ": rpb must be contiguous");
}

// dtype of the saved log-sum-exp: float64 for float64 inputs, else float32.
inline at::ScalarType lse_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline Shape3d check_fused_forward(const char* op, int nd, const at::Tensor& query,
                                   const at::Tensor& key, const at::Tensor& value,
                                   const c10::optional<at::Tensor>& rpb,
                                   at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                   const c10::List<bool>& is_causal) {
  const bool has_rpb = rpb.has_value() && rpb->defined();
  Shape3d s = check_config(query, op, "query", nd, kernel_size, dilation, is_causal, has_rpb);
  check_like(query, key, op, "query", "key");
  check_like(query, value, op, "query", "value");
  if (has_rpb) check_rpb(*rpb, query, s, nd, op);
  return s;
}

inline Shape3d check_fused_backward(const char* op, int nd, const at::Tensor& grad_out,
                                    const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value,
                                    const c10::optional<at::Tensor>& rpb,
                                    const at::Tensor& out, const at::Tensor& logsumexp,
                                    at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                    const c10::List<bool>& is_causal) {
  Shape3d s = check_fused_forward(op, nd, query, key, value, rpb, kernel_size, dilation,
                                  is_causal);
  check_like(query, grad_out, op, "query", "grad_out");
  check_like(query, out, op, "query", "out");
  TORCH_CHECK(logsumexp.defined(), op, ": logsumexp must be a tensor");
  TORCH_CHECK(logsumexp.sizes() == query.sizes().slice(0, query.dim() - 1), op,
              ": logsumexp must have shape ", query.sizes().slice(0, query.dim() - 1), ", got ",
              logsumexp.sizes());
  TORCH_CHECK(logsumexp.scalar_type() == lse_dtype(query.scalar_type()), op,
              ": logsumexp must be ", lse_dtype(query.scalar_type()), ", got ",
              logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.device() == query.device(), op, ": logsumexp is on ",
              logsumexp.device(), ", query on ", query.device());
  TORCH_CHECK(logsumexp.is_contiguous(), op, ": logsumexp must be contiguous");
  return s;
}

inline void check_attn(const char* op, const at::Tensor& attn, const at::Tensor& value,
                       const Shape3d& s) {
  TORCH_CHECK(attn.defined(), op, ": attn must be a tensor");
  std::vector<int64_t> expected(value.sizes().begin(), value.sizes().end() - 1);
  expected.push_back(s.slots());
  TORCH_CHECK(attn.sizes() == at::IntArrayRef(expected), op,
              ": attn must have shape [B, heads, *spatial, prod(kernel_size)] = ",
              at::IntArrayRef(expected), ", got ", attn.sizes());
  TORCH_CHECK(attn.scalar_type() == value.scalar_type(), op, ": attn and value dtypes differ: ",
              attn.scalar_type(), " vs ", value.scalar_type());
  TORCH_CHECK(attn.device() == value.device(), op, ": attn is on ", attn.device(),
              ", value on ", value.device());
  TORCH_CHECK(attn.is_contiguous(), op, ": attn must be contiguous");
}

// The checks of the unfused 2-D ops; each returns the problem as 3-D.
inline Shape3d check_qk(const at::Tensor& query, const at::Tensor& key,
                        const c10::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                        at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk";
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const Shape3d s = check_config(query, op, "query", 2, kernel_size, dilation, is_causal,
                                 has_rpb);
  check_like(query, key, op, "query", "key");
  if (has_rpb) check_rpb(*rpb, query, s, 2, op);
  return s;
}

inline Shape3d check_qk_backward(const at::Tensor& grad_attn, const at::Tensor& query,
                                 const at::Tensor& key, bool has_rpb,
                                 at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                 const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk_backward";
  const Shape3d s = check_config(query, op, "query", 2, kernel_size, dilation, is_causal,
                                 has_rpb);
  check_like(query, key, op, "query", "key");
  check_attn(op, grad_attn, query, s);
  return s;
}

inline Shape3d check_av(const char* op, const at::Tensor& attn, const at::Tensor& value,
                        at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                        const c10::List<bool>& is_causal) {
  const Shape3d s = check_config(value, op, "value", 2, kernel_size, dilation, is_causal,
                                 false);
  check_attn(op, attn, value, s);
  return s;
}

inline Shape3d check_av_backward(const at::Tensor& grad_out, const at::Tensor& attn,
                                 const at::Tensor& value, at::IntArrayRef kernel_size,
                                 at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_av_backward";
  const Shape3d s = check_av(op, attn, value, kernel_size, dilation, is_causal);
  check_like(value, grad_out, op, "value", "grad_out");
  return s;
}

// Shape of the attention map of `like` ([B, heads, *spatial, D]): [B, heads, *spatial, slots].
inline std::vector<int64_t> attn_shape(const at::Tensor& like, const Shape3d& s) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end() - 1);
  shape.push_back(s.slots());
  return shape;
}

inline const char* fused_name(int nd, bool backward) {
  static const char* names[2][3] = {{"na1d_forward", "na2d_forward", "na3d_forward"},
                                    {"na1d_backward", "na2d_backward", "na3d_backward"}};
  return names[backward ? 1 : 0][nd - 1];
}

// ------------------------------------------------------------------------------------------
// Registration: one backend's launchers, Forward(nd, ...) and Backward(nd, ...) for the fused
// ops (nd = 1, 2, 3) and the four unfused ones with their schema signatures, become its
// kernels of the ten ops (the body of the backend's TORCH_LIBRARY_IMPL).
// ------------------------------------------------------------------------------------------
template <auto Forward, int ND>
std::tuple<at::Tensor, at::Tensor> forward_nd(const at::Tensor& query, const at::Tensor& key,
                                              const at::Tensor& value,
                                              const c10::optional<at::Tensor>& rpb,
                                              at::IntArrayRef kernel_size,
                                              at::IntArrayRef dilation,
                                              const c10::List<bool>& is_causal, double scale) {
  return Forward(ND, query, key, value, rpb, kernel_size, dilation, is_causal, scale);
}

template <auto Backward, int ND>
std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> backward_nd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& logsumexp, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    const c10::List<bool>& is_causal, double scale) {
  return Backward(ND, grad_out, query, key, value, rpb, out, logsumexp, kernel_size, dilation,
                  is_causal, scale);
}

template <auto Forward, auto Backward, auto Qk, auto QkBackward, auto Av, auto AvBackward>
void register_kernels(torch::Library& m) {
  m.impl("na1d_forward", &forward_nd<Forward, 1>);
  m.impl("na2d_forward", &forward_nd<Forward, 2>);
  m.impl("na3d_forward", &forward_nd<Forward, 3>);
  m.impl("na1d_backward", &backward_nd<Backward, 1>);
  m.impl("na2d_backward", &backward_nd<Backward, 2>);
  m.impl("na3d_backward", &backward_nd<Backward, 3>);
  m.impl("na2d_qk", Qk);
  m.impl("na2d_qk_backward", QkBackward);
  m.impl("na2d_av", Av);
  m.impl("na2d_av_backward", AvBackward);
}

}  // namespace na
}  // namespace mmboat
