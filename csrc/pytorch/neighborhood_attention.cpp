// Schemas of the neighborhood-attention ops (the single source of truth for their signatures).
//
// Refinements of the shared contract (na_contract.md):
// * logsumexp is float64 for float64 inputs (float32 otherwise), so float64 gradients stay
//   exact; kernels check it.
// * na_axis_window(length, kernel_size, dilation, is_causal) -> int64 [L, 5] exposes the
//   window rule of csrc/common/neighborhood_attention.h per query i: (first key, valid key
//   count, rpb index of slot 0, first query attending key i, last query attending key i);
//   tests tie it to the spec and to the pure-PyTorch reference.
// * Besides na2d_qk/na2d_av the kernels accept any 1-3 spatial dims internally; only the 2-D
//   unfused ops are exposed.
// Kernels: cpu/neighborhood_attention_cpu.cpp (CPU), cuda/ (CUDA). The fused ops' autograd is
// registered here (a C++ autograd function at the Autograd key: no Python on the training
// path); fake kernels, and the unfused ops' autograd, are registered in Python
// (mmboat/ops/neighborhood_attention.py).
#include <torch/extension.h>

#include "neighborhood_attention_checks.h"

namespace mmboat {
namespace {

at::Tensor na_axis_window(int64_t length, int64_t kernel_size, int64_t dilation,
                          bool is_causal) {
  TORCH_CHECK(kernel_size >= 1 && dilation >= 1, "na_axis_window: kernel_size and dilation "
              "must be >= 1, got ", kernel_size, " and ", dilation);
  TORCH_CHECK(length >= kernel_size * dilation, "na_axis_window: length ", length,
              " is smaller than kernel_size * dilation = ", kernel_size * dilation);
  TORCH_CHECK(length < (int64_t(1) << 30), "na_axis_window: length too large");
  at::Tensor out = at::empty({length, 5}, at::kLong);
  auto acc = out.accessor<int64_t, 2>();
  for (int64_t i = 0; i < length; ++i) {
    const auto w = na::axis_window(int(i), int(length), int(kernel_size), int(dilation),
                                   is_causal);
    const auto r = na::axis_inverse_range(int(i), int(length), int(kernel_size),
                                          int(dilation), is_causal);
    acc[i][0] = w.start;
    acc[i][1] = w.count;
    acc[i][2] = w.bias_start;
    acc[i][3] = r.first;
    acc[i][4] = r.last;
  }
  return out;
}

// Autograd of the fused ops: forward runs the op below the autograd key and saves its inputs,
// output and log-sum-exp (not the attention); backward runs naNd_backward. The log-sum-exp
// output is not differentiable.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <int ND>
struct FusedNA : public torch::autograd::Function<FusedNA<ND>> {
  static const char* forward_name() {
    return ND == 1 ? "mmboat::na1d_forward" : ND == 2 ? "mmboat::na2d_forward"
                                                       : "mmboat::na3d_forward";
  }
  static const char* backward_name() {
    return ND == 1 ? "mmboat::na1d_backward" : ND == 2 ? "mmboat::na2d_backward"
                                                        : "mmboat::na3d_backward";
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value,
                               const c10::optional<at::Tensor>& rpb,
                               at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                               const c10::List<bool>& is_causal, double scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(forward_name(), "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, at::IntArrayRef,
                             at::IntArrayRef, const c10::List<bool>&, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(query, key, value, rpb, kernel_size, dilation, is_causal, scale);
    const bool has_rpb = rpb.has_value() && rpb->defined();
    ctx->save_for_backward({query, key, value, has_rpb ? *rpb : at::Tensor(), out, lse});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_rpb"] = has_rpb;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(backward_name(), "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor,
                                           c10::optional<at::Tensor>>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const c10::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                             at::IntArrayRef, const c10::List<bool>&, double)>();
    const auto saved = ctx->get_saved_variables();
    const bool has_rpb = ctx->saved_data["has_rpb"].toBool();
    if (!grads[0].defined())  // the output does not reach the loss
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const auto is_causal = ctx->saved_data["is_causal"].toBoolList();
    c10::optional<at::Tensor> rpb;
    if (has_rpb) rpb = saved[3];
    auto [dq, dk, dv, drpb] =
        op.call(grads[0].contiguous(), saved[0], saved[1], saved[2], rpb, saved[4], saved[5],
                kernel_size, dilation, is_causal, ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, drpb.has_value() ? *drpb : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <int ND>
std::tuple<at::Tensor, at::Tensor> fused_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const c10::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
    at::IntArrayRef dilation, const c10::List<bool>& is_causal, double scale) {
  auto res = FusedNA<ND>::apply(query, key, value, rpb, kernel_size, dilation, is_causal,
                                scale);
  return {res[0], res[1]};
}

}  // namespace
}  // namespace mmboat

TORCH_LIBRARY_IMPL(mmboat, Autograd, m) {
  m.impl("na1d_forward", &mmboat::fused_forward_autograd<1>);
  m.impl("na2d_forward", &mmboat::fused_forward_autograd<2>);
  m.impl("na3d_forward", &mmboat::fused_forward_autograd<3>);
}

TORCH_LIBRARY_FRAGMENT(mmboat, m) {
  for (const char* nd : {"1", "2", "3"}) {
    const std::string name = std::string("na") + nd + "d";
    m.def((name + "_forward(Tensor query, Tensor key, Tensor value, Tensor? rpb, "
                  "int[] kernel_size, int[] dilation, bool[] is_causal, float scale) -> "
                  "(Tensor out, Tensor logsumexp)")
              .c_str());
    m.def((name + "_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
                  "Tensor? rpb, Tensor out, Tensor logsumexp, int[] kernel_size, "
                  "int[] dilation, bool[] is_causal, float scale) -> (Tensor grad_query, "
                  "Tensor grad_key, Tensor grad_value, Tensor? grad_rpb)")
              .c_str());
  }
  m.def("na2d_qk(Tensor query, Tensor key, Tensor? rpb, int[] kernel_size, int[] dilation, "
        "bool[] is_causal) -> Tensor attn");
  m.def("na2d_qk_backward(Tensor grad_attn, Tensor query, Tensor key, bool has_rpb, "
        "int[] kernel_size, int[] dilation, bool[] is_causal) -> (Tensor grad_query, "
        "Tensor grad_key, Tensor? grad_rpb)");
  m.def("na2d_av(Tensor attn, Tensor value, int[] kernel_size, int[] dilation, "
        "bool[] is_causal) -> Tensor out");
  m.def("na2d_av_backward(Tensor grad_out, Tensor attn, Tensor value, int[] kernel_size, "
        "int[] dilation, bool[] is_causal) -> (Tensor grad_attn, Tensor grad_value)");
  m.def("na_axis_window(int length, int kernel_size, int dilation, bool is_causal) -> Tensor",
        &mmboat::na_axis_window);
}
