// The one TORCH_LIBRARY block of the `mmboat` namespace and the Python module entry.
// Op families add their schemas with TORCH_LIBRARY_FRAGMENT(mmboat, m) in their own files
// (csrc/pytorch/<family>.cpp) and their kernels with TORCH_LIBRARY_IMPL in cpu/ and cuda/.
#include <torch/extension.h>

#include <string>

#define MMBOAT_STR2(x) #x
#define MMBOAT_STR(x) MMBOAT_STR2(x)

namespace mmboat {

std::string ext_info() {
  std::string info = "torch=" MMBOAT_STR(TORCH_VERSION_MAJOR) "." MMBOAT_STR(
      TORCH_VERSION_MINOR) "." MMBOAT_STR(TORCH_VERSION_PATCH) ";cuda=";
#ifdef MMBOAT_WITH_CUDA
  info += "1;archs=" MMBOAT_CUDA_ARCHS;
#else
  info += "0";
#endif
#if defined(_OPENMP)
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

// Eager autograd entry of the fused neighborhood-attention ops (neighborhood_attention.cpp).
at::Tensor na_fused(int64_t nd, const at::Tensor& query, const at::Tensor& key,
                    const at::Tensor& value, const c10::optional<at::Tensor>& rpb,
                    const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& dilation,
                    const std::vector<bool>& is_causal, double scale);

}  // namespace mmboat

TORCH_LIBRARY(mmboat, m) {
  m.def("ext_info() -> str", &mmboat::ext_info);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmboat compiled ops; they are registered as torch.ops.mmboat.*";
  m.def("ext_info", &mmboat::ext_info, "build information");
  m.def("na_fused", &mmboat::na_fused,
        "fused neighborhood attention, mmboat::na{nd}d_forward / _backward under a C++ "
        "autograd Function (the eager path of mmboat.ops.na1d/na2d/na3d)",
        pybind11::arg("nd"), pybind11::arg("query"), pybind11::arg("key"), pybind11::arg("value"),
        pybind11::arg("rpb"), pybind11::arg("kernel_size"), pybind11::arg("dilation"),
        pybind11::arg("is_causal"), pybind11::arg("scale"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
