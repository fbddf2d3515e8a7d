// CPU launchers of the neighborhood-attention ops (schemas: ../neighborhood_attention.cpp).
//
// Layering (as on CUDA): this file checks the arguments (neighborhood_attention_checks.h),
// allocates the outputs, dispatches on the dtype and hands raw pointers and ATen's thread pool
// (aten_parallel.h) to the torch-free kernels of csrc/common/cpu/neighborhood_attention_kernels.h,
// which hold the algorithm (window walk, task layout, scalar and AVX2 paths). float16 and
// bfloat16 accumulate in float32, float64 in float64; gradients are accumulated in that type and
// converted at the end.
#include <torch/extension.h>

#include <tuple>

#include "cpu/aten_parallel.h"
#include "cpu/neighborhood_attention_kernels.h"
#include "neighborhood_attention_checks.h"

namespace mmboat {
namespace na {
namespace {

namespace kern = ::mmboat::cpu::na;

void check_window_rows(const Shape3d& s) {
  TORCH_CHECK(int64_t(s.kernel[0]) * s.kernel[1] <= kern::kMaxWindowRows,
              "neighborhood attention (CPU): kernel_size product over the leading axes must "
              "be <= ", kern::kMaxWindowRows);
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Accumulation buffer (acc_t) for a gradient of `like`'s shape, zero-filled or not.
template <typename acc_t>
at::Tensor accumulation_buffer(const at::Tensor& like, bool zeroed = true) {
  const auto options = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  return zeroed ? at::zeros(like.sizes(), options) : at::empty(like.sizes(), options);
}

// `acc` as `like`'s dtype (no copy when it already is).
at::Tensor to_dtype_of(const at::Tensor& acc, const at::Tensor& like) {
  return acc.scalar_type() == like.scalar_type() ? acc : acc.to(like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> fused_forward(int nd, const at::Tensor& query,
                                                 const at::Tensor& key, const at::Tensor& value,
                                                 const c10::optional<at::Tensor>& rpb_opt,
                                                 at::IntArrayRef kernel_size,
                                                 at::IntArrayRef dilation,
                                                 const c10::List<bool>& is_causal, double scale) {
  const Shape3d s = check_fused_forward(fused_name(nd, false), nd, query, key, value, rpb_opt,
                                        kernel_size, dilation, is_causal);
  check_window_rows(s);
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, query.dim() - 1),
                             query.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() == 0) return {out, lse};
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = acc_t<scalar_t>;
    kern::fused_forward(AtenParallel(), kern::make_problem(s, scale, data_or_null<scalar_t>(rpb)),
                        query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
                        value.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                        lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> fused_backward(
    int nd, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& rpb_opt, const at::Tensor& out,
    const at::Tensor& logsumexp, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    const c10::List<bool>& is_causal, double scale) {
  const Shape3d s = check_fused_backward(fused_name(nd, true), nd, grad_out, query, key, value,
                                         rpb_opt, out, logsumexp, kernel_size, dilation,
                                         is_causal);
  check_window_rows(s);
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  at::Tensor dq = at::empty_like(query);
  at::Tensor dk, dv, drpb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = acc_t<scalar_t>;
    // dK and dV are written by the kernel (see key_row), not zero-filled first.
    at::Tensor dk_acc = accumulation_buffer<acc_t>(key, false);
    at::Tensor dv_acc = accumulation_buffer<acc_t>(value, false);
    at::Tensor drpb_acc;
    if (s.has_rpb) drpb_acc = at::zeros(rpb.sizes(), rpb.options().dtype(dk_acc.scalar_type()));
    if (query.numel() > 0)
      kern::fused_backward(
          AtenParallel(), kern::make_problem(s, scale, data_or_null<scalar_t>(rpb)),
          grad_out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
          value.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), logsumexp.data_ptr<acc_t>(),
          dq.data_ptr<scalar_t>(), dk_acc.data_ptr<acc_t>(), dv_acc.data_ptr<acc_t>(),
          data_or_null<acc_t>(drpb_acc));
    dk = to_dtype_of(dk_acc, key);
    dv = to_dtype_of(dv_acc, value);
    if (s.has_rpb) drpb = to_dtype_of(drpb_acc, rpb);
  });
  c10::optional<at::Tensor> grad_rpb;
  if (s.has_rpb) grad_rpb = drpb;
  return {dq, dk, dv, grad_rpb};
}

// ------------------------------------------------------------------------------------------
// Unfused 2-D ops.
// ------------------------------------------------------------------------------------------
at::Tensor qk_forward(const at::Tensor& query, const at::Tensor& key,
                      const c10::optional<at::Tensor>& rpb_opt, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const Shape3d s = check_qk(query, key, rpb_opt, kernel_size, dilation, is_causal);
  at::Tensor attn = at::empty(attn_shape(query, s), query.options());
  if (attn.numel() == 0) return attn;
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    kern::qk_forward(AtenParallel(), kern::make_problem(s, 1.0, data_or_null<scalar_t>(rpb)),
                     query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
                     attn.data_ptr<scalar_t>());
  });
  return attn;
}

at::Tensor av_forward(const at::Tensor& attn, const at::Tensor& value,
                      at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                      const c10::List<bool>& is_causal) {
  const Shape3d s = check_av("na2d_av", attn, value, kernel_size, dilation, is_causal);
  at::Tensor out = at::empty_like(value);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "na_cpu", [&] {
    kern::av_forward(AtenParallel(), kern::make_problem<scalar_t>(s, 1.0, nullptr),
                     attn.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qk_backward(
    const at::Tensor& grad_attn, const at::Tensor& query, const at::Tensor& key, bool has_rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const Shape3d s =
      check_qk_backward(grad_attn, query, key, has_rpb, kernel_size, dilation, is_causal);
  at::Tensor dq = at::empty_like(query);
  at::Tensor dk, drpb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = acc_t<scalar_t>;
    at::Tensor dk_acc = accumulation_buffer<acc_t>(key);
    at::Tensor drpb_acc;
    if (has_rpb)
      drpb_acc = at::zeros({s.heads, s.bias_extent(1), s.bias_extent(2)}, dk_acc.options());
    if (query.numel() > 0)
      kern::qk_backward(AtenParallel(), kern::make_problem<scalar_t>(s, 1.0, nullptr),
                        grad_attn.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(),
                        key.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                        dk_acc.data_ptr<acc_t>(), data_or_null<acc_t>(drpb_acc));
    dk = to_dtype_of(dk_acc, key);
    if (has_rpb) drpb = drpb_acc.to(query.scalar_type());
  });
  c10::optional<at::Tensor> grad_rpb;
  if (has_rpb) grad_rpb = drpb;
  return {dq, dk, grad_rpb};
}

std::tuple<at::Tensor, at::Tensor> av_backward(const at::Tensor& grad_out,
                                               const at::Tensor& attn, const at::Tensor& value,
                                               at::IntArrayRef kernel_size,
                                               at::IntArrayRef dilation,
                                               const c10::List<bool>& is_causal) {
  const Shape3d s = check_av_backward(grad_out, attn, value, kernel_size, dilation, is_causal);
  at::Tensor dattn = at::zeros_like(attn);
  at::Tensor dv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "na_cpu", [&] {
    using acc_t = acc_t<scalar_t>;
    at::Tensor dv_acc = accumulation_buffer<acc_t>(value);
    if (value.numel() > 0)
      kern::av_backward(AtenParallel(), kern::make_problem<scalar_t>(s, 1.0, nullptr),
                        grad_out.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                        value.data_ptr<scalar_t>(), dattn.data_ptr<scalar_t>(),
                        dv_acc.data_ptr<acc_t>());
    dv = to_dtype_of(dv_acc, value);
  });
  return {dattn, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmboat, CPU, m) {
  register_kernels<&fused_forward, &fused_backward, &qk_forward, &qk_backward, &av_forward,
                   &av_backward>(m);
}

}  // namespace na
}  // namespace mmboat
