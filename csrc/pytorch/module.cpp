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

}  // namespace mmboat

TORCH_LIBRARY(mmboat, m) {
  m.def("ext_info() -> str", &mmboat::ext_info);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmboat compiled ops; they are registered as torch.ops.mmboat.*";
  m.def("ext_info", &mmboat::ext_info, "build information");
}
