// Feature-space local attention ops (BOAT FSLA): the device-independent half of the launchers,
// shared by the CPU (cpu/feature_space_attention_cpu.cpp) and CUDA
// (cuda/feature_space_attention_cuda.cu) ones: input checks and the registration of a backend's
// kernels. Schemas and the checks' code live in feature_space_attention.cpp.
#pragma once
#include <torch/extension.h>

namespace mmboat {
namespace fsla {

// x [B, heads, N, d] floating point; cluster_size >= 1; iters >= 0; finite tau.
void check_cluster_inputs(const at::Tensor& x, int64_t cluster_size, int64_t iters, double tau);

// The dtypes a backend's attention kernels take: float32 and float64 on CPU, also float16 and
// bfloat16 on CUDA.
enum class Backend { kCPU, kCUDA };

// q/k/v [B, heads, N, d] of one of the backend's dtypes, same dtype, device, contiguous
// (query on the backend's device); perm [B, heads, N] int64; 1 <= cluster_size;
// 0 <= overlap < cluster_size. Does not read perm's values. Failures name `op`.
void check_attention_inputs(const char* op, Backend backend, const at::Tensor& query,
                            const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& perm, int64_t cluster_size, int64_t overlap);

// Backward also checks grad_out/out like query and logsumexp [B, heads, N] (query's dtype).
void check_attention_backward_inputs(const char* op, Backend backend, const at::Tensor& grad_out,
                                     const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& perm,
                                     const at::Tensor& out, const at::Tensor& logsumexp,
                                     int64_t cluster_size, int64_t overlap);

// Registers one backend's launchers as its kernels of the three ops (the body of the backend's
// TORCH_LIBRARY_IMPL).
template <auto Cluster, auto Forward, auto Backward>
void register_kernels(torch::Library& m) {
  m.impl("bhc_cluster", Cluster);
  m.impl("clustered_attention_forward", Forward);
  m.impl("clustered_attention_backward", Backward);
}

}  // namespace fsla
}  // namespace mmboat
