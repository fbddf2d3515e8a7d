// Helpers shared by the torch-free CUDA kernels of csrc/common/cuda/ (the torch side of the
// launchers has its own: csrc/pytorch/cuda/pytorch_cuda_helper.h).
//
// * Element types: to_f / from_f<T> convert an element to and from its accumulation type acc_t<T>
//   (kernel_defs.h: float for float, half and bfloat16; double for double), rounding to nearest.
// * Device math overloaded on float / double (exp_f, log_f, max_f).
// * Launch, dynamic shared memory, warp shuffles and launch errors go through the MMBOAT_*
//   macros below, so that tests/test_ops/cuda_driver/cuda_emulation.h (MMBOAT_CUDA_EMULATION)
//   can run every kernel on the host of a machine without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#ifndef MMBOAT_CUDA_EMULATION
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_defs.h"

#ifdef MMBOAT_CUDA_EMULATION
#define MMBOAT_DYNAMIC_SMEM(name) unsigned char* name = ::mmboat_emu::dynamic_smem()
#define MMBOAT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mmboat_emu::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)
#define MMBOAT_SHFL_XOR(mask, v, o) ::mmboat_emu::shfl_xor_sync(mask, v, o)
#define MMBOAT_SYNCWARP() ((void)::mmboat_emu::shfl_xor_sync(0xffffffffu, 0.f, 1))
#define MMBOAT_LAUNCH_ERROR() static_cast<const char*>(nullptr)
#else
#define MMBOAT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MMBOAT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MMBOAT_SHFL_XOR(mask, v, o) __shfl_xor_sync(mask, v, o)
#define MMBOAT_SYNCWARP() __syncwarp()
// The error of the last launch as a message, or nullptr.
#define MMBOAT_LAUNCH_ERROR() \
  (cudaPeekAtLastError() != cudaSuccess ? cudaGetErrorString(cudaGetLastError()) : nullptr)
#endif

#define MMBOAT_CUDA_HD __host__ __device__ __forceinline__

namespace mmboat {
namespace cuda {

// ------------------------------------------------------------------ element types
// acc_t<T> (kernel_defs.h) is the accumulation type; ElemTraits converts to and from it.
template <typename T>
struct ElemTraits;
template <>
struct ElemTraits<double> {
  static MMBOAT_CUDA_HD double to_acc(double x) { return x; }
  static MMBOAT_CUDA_HD double from_acc(double x) { return x; }
};
template <>
struct ElemTraits<float> {
  static MMBOAT_CUDA_HD float to_acc(float x) { return x; }
  static MMBOAT_CUDA_HD float from_acc(float x) { return x; }
};
template <>
struct ElemTraits<__half> {
  static MMBOAT_CUDA_HD float to_acc(__half x) { return __half2float(x); }
  static MMBOAT_CUDA_HD __half from_acc(float x) { return __float2half_rn(x); }
};
template <>
struct ElemTraits<__nv_bfloat16> {
  static MMBOAT_CUDA_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static MMBOAT_CUDA_HD __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
MMBOAT_CUDA_HD acc_t<T> to_f(T x) {
  return ElemTraits<T>::to_acc(x);
}
template <typename T>
MMBOAT_CUDA_HD T from_f(acc_t<T> x) {
  return ElemTraits<T>::from_acc(x);
}

// ------------------------------------------------------------------ device math
__device__ __forceinline__ float exp_f(float x) { return expf(x); }
__device__ __forceinline__ double exp_f(double x) { return exp(x); }
__device__ __forceinline__ float log_f(float x) { return logf(x); }
__device__ __forceinline__ double log_f(double x) { return log(x); }
__device__ __forceinline__ float max_f(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_f(double a, double b) { return fmax(a, b); }

}  // namespace cuda
}  // namespace mmboat
