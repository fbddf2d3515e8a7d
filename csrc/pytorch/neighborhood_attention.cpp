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
// Kernels: cpu/neighborhood_attention_cpu.cpp (CPU), cuda/ (CUDA). Fake kernels and autograd
// are registered in Python (mmboat/ops/neighborhood_attention.py).
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

}  // namespace
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
