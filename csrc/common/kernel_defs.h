// Definitions shared by every torch-free kernel header of csrc/common/ (CPU and CUDA alike).
#pragma once

// Functions both the CPU and the CUDA kernels call: host + device under nvcc, inline otherwise.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMBOAT_HD __host__ __device__ __forceinline__
#else
#define MMBOAT_HD inline
#endif

namespace mmboat {

// Accumulation type of the kernels for element type T: float (for float32, float16 and
// bfloat16), double for double. The log-sum-exp the NA ops save has this type too.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace mmboat
