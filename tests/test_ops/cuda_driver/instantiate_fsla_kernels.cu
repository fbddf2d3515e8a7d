// Torch-free compile check: instantiates every FSLA kernel template of
// csrc/common/cuda/feature_space_attention_kernels.cuh for float, half, bfloat16 and double, so
// `nvcc -c` compiles them all. Compiled (never run) by tests/test_ops/test_fsla_cuda_compile.py.
#include "cuda/feature_space_attention_kernels.cuh"

namespace fs = mmboat::cuda::fsla;

const char* instantiate_cluster(const float* x, float* fs_scratch, void* keys, int64_t* tokens,
                                int64_t* perm, int64_t* inv, cudaStream_t stream) {
  return fs::launch_bhc_cluster(x, 2, 200, 32, 49, 2, 100.f, fs_scratch, keys, tokens, perm, inv,
                                stream);
}

template <typename T>
const char* instantiate_attention(T* a, T* b, T* c, T* d, T* e, T* f, T* g, T* h,
                                  fs::acc_t<T>* gk, fs::acc_t<T>* gv, const int64_t* perm,
                                  cudaStream_t stream) {
  const fs::AttnProblem p = fs::make_attn_problem(4, 200, 32, 49, 20, 0.17f);
  const char* err = fs::launch_attention_forward<T>(p, a, b, c, perm, d, e, 227 * 1024, stream);
  if (!err)
    err = fs::launch_attention_backward<T>(p, a, b, c, d, e, perm, f, gk, gv, g, h, 227 * 1024,
                                           stream);
  return err;
}

template const char* instantiate_attention<float>(float*, float*, float*, float*, float*, float*,
                                                  float*, float*, float*, float*,
                                                  const int64_t*, cudaStream_t);
template const char* instantiate_attention<__half>(__half*, __half*, __half*, __half*, __half*,
                                                   __half*, __half*, __half*, float*, float*,
                                                   const int64_t*, cudaStream_t);
template const char* instantiate_attention<__nv_bfloat16>(
    __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*,
    __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, float*, float*, const int64_t*,
    cudaStream_t);
template const char* instantiate_attention<double>(double*, double*, double*, double*, double*,
                                                   double*, double*, double*, double*, double*,
                                                   const int64_t*, cudaStream_t);
