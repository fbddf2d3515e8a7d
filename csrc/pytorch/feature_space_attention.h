// Feature-space local attention ops (BOAT FSLA): input checks shared by the CPU and CUDA
// kernels. Schemas live in feature_space_attention.cpp.
#pragma once
#include <torch/extension.h>

namespace mmboat {
namespace fsla {

// x [B, heads, N, d] floating point; cluster_size >= 1; iters >= 0; finite tau.
void check_cluster_inputs(const at::Tensor& x, int64_t cluster_size, int64_t iters, double tau);

// q/k/v [B, heads, N, d] same dtype (float32/float64), device, contiguous; perm [B, heads, N]
// int64; 1 <= cluster_size; 0 <= overlap < cluster_size. Does not read perm's values.
void check_attention_inputs(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& perm,
                            int64_t cluster_size, int64_t overlap);

// Backward also checks grad_out/out like query and logsumexp [B, heads, N].
void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& query,
                                     const at::Tensor& key, const at::Tensor& value,
                                     const at::Tensor& perm, const at::Tensor& out,
                                     const at::Tensor& logsumexp, int64_t cluster_size,
                                     int64_t overlap);

}  // namespace fsla
}  // namespace mmboat
