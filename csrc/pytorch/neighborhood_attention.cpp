// Schemas of the neighborhood-attention ops (the single source of truth for their signatures).
//
// Refinements of the shared contract (docs/neighborhood_attention.md):
// * logsumexp is float64 for float64 inputs (float32 otherwise), so float64 gradients stay
//   exact; kernels check it.
// * na_axis_window(length, kernel_size, dilation, is_causal) -> int64 [L, 5] exposes the
//   window rule of csrc/common/neighborhood_attention.h per query i: (first key, valid key
//   count, rpb index of slot 0, first query attending key i, last query attending key i);
//   tests tie it to the spec and to the pure-PyTorch reference.
// * Besides na2d_qk/na2d_av the kernels accept any 1-3 spatial dims internally; only the 2-D
//   unfused ops are exposed.
// Kernels: cpu/neighborhood_attention_cpu.cpp (CPU), cuda/ (CUDA). Fake kernels and autograd
// are registered in Python (mmboat/ops/neighborhood_attention.py); that registration is what
// torch.compile traces. Eager calls take `na_fused` below instead (bound in module.cpp): the
// same forward and backward ops wrapped in a C++ autograd Function, so a forward + backward
// runs no Python beyond the call itself.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
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

using ForwardOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    at::IntArrayRef, at::IntArrayRef, const c10::List<bool>&, double);
using BackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
    at::IntArrayRef, const c10::List<bool>&, double);

// Typed handle of mmboat::na{nd}d_{what} (looked up once).
template <class Sig>
const c10::TypedOperatorHandle<Sig>& fused_op(int64_t nd, const char* what) {
  static const auto find = [](int64_t n, const char* w) {
    return c10::Dispatcher::singleton()
        .findSchemaOrThrow(("mmboat::na" + std::to_string(n) + "d_" + w).c_str(), "")
        .template typed<Sig>();
  };
  static const c10::TypedOperatorHandle<Sig> ops[3] = {find(1, what), find(2, what),
                                                       find(3, what)};
  return ops[nd - 1];
}

// Eager autograd of the fused ops: forward saves q, k, v, rpb, out and the log-sum-exp; the
// backward calls the backward op (through autograd when a graph of the gradients is being
// built, so a second derivative fails with torch's error for ops without a derivative).
struct FusedNA : public torch::autograd::Function<FusedNA> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& query,
                            const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& rpb, int64_t nd,
                            const std::vector<int64_t>& kernel_size,
                            const std::vector<int64_t>& dilation,
                            const c10::List<bool>& is_causal, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = fused_op<ForwardOp>(nd, "forward")
                          .call(query, key, value, rpb, kernel_size, dilation, is_causal, scale);
    ctx->save_for_backward({query, key, value, rpb.value_or(at::Tensor()), out, lse});
    ctx->saved_data["nd"] = nd;
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    c10::optional<at::Tensor> rpb;
    if (saved[3].defined()) rpb = saved[3];
    const auto& data = ctx->saved_data;
    const auto ks = data.at("kernel_size").toIntVector();
    const auto ds = data.at("dilation").toIntVector();
    const auto cs = data.at("is_causal").toBoolList();
    const auto call = [&] {
      return fused_op<BackwardOp>(data.at("nd").toInt(), "backward")
          .call(grads[0].contiguous(), saved[0], saved[1], saved[2], rpb, saved[4], saved[5],
                ks, ds, cs, data.at("scale").toDouble());
    };
    std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> g;
    if (at::GradMode::is_enabled()) {
      g = call();
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = call();
    }
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g),
            std::get<3>(g).value_or(at::Tensor()), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// Checks of the arguments are the ops' own (csrc/pytorch/neighborhood_attention_checks.h).
at::Tensor na_fused(int64_t nd, const at::Tensor& query, const at::Tensor& key,
                    const at::Tensor& value, const c10::optional<at::Tensor>& rpb,
                    const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& dilation,
                    const std::vector<bool>& is_causal, double scale) {
  TORCH_CHECK(nd >= 1 && nd <= 3, "na_fused: nd must be 1, 2 or 3, got ", nd);
  c10::List<bool> causal;
  for (bool c : is_causal) causal.push_back(c);
  return FusedNA::apply(query, key, value, rpb, nd, kernel_size, dilation, causal, scale);
}

}  // namespace mmboat

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

// The backward ops have no derivative of their own: differentiating through them (a second
// backward after create_graph=True) raises "derivative for mmboat::... is not implemented"
// rather than torch's default for custom ops, a warning and wrong gradients.
TORCH_LIBRARY_IMPL(mmboat, Autograd, m) {
  for (const char* name : {"na1d_backward", "na2d_backward", "na3d_backward",
                           "na2d_qk_backward", "na2d_av_backward"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}
