// Torch-free compile check: instantiates every neighborhood-attention kernel template (all
// head_dim dispatch branches) for float, half, bfloat16 and double, so `nvcc -c` compiles them
// all.
// Compiled (never run) by tests/test_ops/test_cuda_kernels_compile.py.
#include "cuda/neighborhood_attention_kernels.cuh"

namespace na = mmboat::cuda::na;

template <typename T>
const char* instantiate_all(const na::Problem& p, T* a, T* b, T* c, T* d, T* e, T* f, T* g,
                            na::acc_t<T>* lse, na::acc_t<T>* delta, na::acc_t<T>* grad_rpb,
                            cudaStream_t stream) {
  const char* err = na::launch_fused_forward<T>(p, a, b, c, d, e, lse, 48 * 1024, stream);
  if (!err)
    err = na::launch_fused_backward<T>(p, a, b, c, d, e, f, lse, delta, g, a, b, grad_rpb,
                                       stream);
  if (!err) err = na::launch_qk<T>(p, a, b, c, d, stream);
  if (!err) err = na::launch_qk_backward<T>(p, a, b, c, d, e, grad_rpb, stream);
  if (!err) err = na::launch_av<T>(p, a, b, c, stream);
  if (!err) err = na::launch_av_backward<T>(p, a, b, c, d, e, stream);
  return err;
}

template const char* instantiate_all<float>(const na::Problem&, float*, float*, float*, float*,
                                            float*, float*, float*, float*, float*, float*,
                                            cudaStream_t);
template const char* instantiate_all<__half>(const na::Problem&, __half*, __half*, __half*,
                                             __half*, __half*, __half*, __half*, float*, float*,
                                             float*, cudaStream_t);
template const char* instantiate_all<__nv_bfloat16>(const na::Problem&, __nv_bfloat16*,
                                                    __nv_bfloat16*, __nv_bfloat16*,
                                                    __nv_bfloat16*, __nv_bfloat16*,
                                                    __nv_bfloat16*, __nv_bfloat16*, float*,
                                                    float*, float*, cudaStream_t);
template const char* instantiate_all<double>(const na::Problem&, double*, double*, double*,
                                             double*, double*, double*, double*, double*,
                                             double*, double*, cudaStream_t);
