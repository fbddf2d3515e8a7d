// Helpers shared by the CUDA launchers of csrc/pytorch/cuda/ (the torch side; the kernels'
// torch-free helpers are csrc/common/cuda/cuda_helpers.cuh). Every .cu there includes this
// header first: it brings in torch, c10's CUDA utilities and the argument-check macros.
//
// nvcc in C++20 mode reads `module` in torch's C++ API headers (torch/python.h, pulled in by
// torch/extension.h) as the C++20 keyword and warns (#3189-D) dozens of times; harmless, silenced
// for the torch headers only so that warnings about our own code stand out.
#pragma once
#if defined(__NVCC__)
#pragma nv_diag_suppress 3189
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "checks.h"
#if defined(__NVCC__)
#pragma nv_diag_default 3189
#endif

namespace mmboat {
namespace cuda_launch {

// t is a CUDA tensor of a dtype the CUDA kernels take (float32, float64, float16, bfloat16).
inline void check_cuda_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16 on CUDA, got ", st);
}

// Calls f(T*) (a null pointer: only its type matters) with the CUDA element type of `st`.
template <typename F>
void dispatch_cuda_type(at::ScalarType st, const char* op, F&& f) {
  if (st == at::kFloat) return f(static_cast<float*>(nullptr));
  if (st == at::kDouble) return f(static_cast<double*>(nullptr));
  if (st == at::kHalf) return f(static_cast<__half*>(nullptr));
  if (st == at::kBFloat16) return f(static_cast<__nv_bfloat16*>(nullptr));
  TORCH_CHECK(false, op, ": unsupported dtype ", st, " on CUDA");
}

// The tensor's data as T* (nullptr for an undefined tensor).
template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// Turns a launcher's error message and a CUDA launch error into a RuntimeError naming `op`.
inline void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs a torch-free launcher for the CUDA element type of `st` on the current stream:
// launch(T*, stream) returns the launcher's error message or nullptr; both it and the CUDA
// launch error become a RuntimeError naming `op`.
template <typename F>
void launch_for_dtype(at::ScalarType st, const char* op, F&& launch) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_type(st, op, [&](auto* tag) { check_launch(launch(tag, stream), op); });
}

// Shared memory a block may opt in to on t's device.
inline size_t smem_optin(const at::Tensor& t) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        t.device().index()));
  return size_t(optin);
}

}  // namespace cuda_launch
}  // namespace mmboat
