// BOAT feature-space local attention (FSLA) CUDA kernels: balanced hierarchical clustering and
// clustered attention forward / backward. Torch-free (raw pointers, sizes, a stream); the torch
// launchers live in csrc/pytorch/cuda/feature_space_attention_cuda.cu. The layout rule (group
// extents, leaf keys incl. sibling overlap) and the per-token formulas come from
// csrc/common/balanced_clustering.h, shared with the CPU kernels.
//
// Clustering (float32): one kernel launch per level, one block per (row = sample * head, group):
//   centroid means of the two rank halves (raw features), L2-normalised; `iters` times: cosines
//   with the normalised token features, soft assignment softmax(tau * cos), weighted sums of the
//   raw features, normalise; final cosines -> split score; block-level bitonic sort of the group
//   by (score, rank) (the rank tie-break makes it stable; NaN sorts last as in torch.sort);
//   the group's slice of perm is rewritten in sorted order. Scratch lives in global memory
//   (disjoint per group), so any group size works.
// Attention (float, half, bfloat16 in float32; double in double, as on CPU, so float64 gradcheck
//   runs on a GPU; acc_t<T> below): one block per (row, leaf), keys/values of the leaf (own
//   tokens + sibling overlap) gathered through perm into shared memory as acc_t<T>; one warp per
//   query: logits, max, sum of
//   exponentials and probabilities (exact two-pass softmax over the <= m + o keys), out = P V,
//   lse = max + log(sum) written in the input dtype (the dtype the op schema / fake kernel use).
// Backward: same blocks; the softmax normaliser is recomputed from the logits (bit-identical to
//   the forward, and independent of the precision of a half/bfloat16 lse); dQ per query (one
//   writer); dK/dV accumulated per leaf in shared memory, then added with acc_t atomics to an
//   acc_t buffer: a key token receives at most two contributions (its own leaf and the sibling
//   leaf whose overlap contains it) and 0 + a + b == 0 + b + a in IEEE arithmetic, so the result
//   is deterministic. A final kernel converts the buffer to the output dtype (skipped for float
//   and double).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "balanced_clustering.h"
#include "cuda_helpers.cuh"

namespace mmboat {
namespace cuda {
namespace fsla {

constexpr int kWarp = 32;
constexpr int kClusterThreads = 256;
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;

// Element types (cuda_helpers.cuh; accumulation: float, double for double), also spelled
// fsla::acc_t / fsla::to_f / fsla::from_f.
using ::mmboat::acc_t;
using ::mmboat::cuda::from_f;
using ::mmboat::cuda::to_f;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += MMBOAT_SHFL_XOR(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max_f(v, MMBOAT_SHFL_XOR(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); `red` holds >= 32 floats. Every
// thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += red[w];
  return total;
}

// ---------------------------------------------------------------------------------------------
// Clustering

// feats_n[t] = x[t] / max(|x[t]|, eps); perm = arange(N) per row.
__global__ void bhc_prepare_kernel(const float* __restrict__ x, int64_t tokens, int64_t n,
                                   int64_t d, float* __restrict__ feats_n,
                                   int64_t* __restrict__ perm) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* xt = x + t * d;
  float sq = 0.f;
  for (int64_t c = 0; c < d; ++c) sq += xt[c] * xt[c];
  const float inv = 1.0f / fmaxf(sqrtf(sq), bhc::kNormEps);
  for (int64_t c = 0; c < d; ++c) feats_n[t * d + c] = xt[c] * inv;
  perm[t] = t % n;
}

// Normalises c0, c1 ([d] each, shared memory) in place.
__device__ __forceinline__ void normalise_pair(float* c0, float* c1, int64_t d, float* red) {
  float s0 = 0.f, s1 = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    s0 += c0[c] * c0[c];
    s1 += c1[c] * c1[c];
  }
  s0 = block_sum(s0, red);
  s1 = block_sum(s1, red);
  const float i0 = 1.0f / fmaxf(sqrtf(s0), bhc::kNormEps);
  const float i1 = 1.0f / fmaxf(sqrtf(s1), bhc::kNormEps);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    c0[c] *= i0;
    c1[c] *= i1;
  }
  __syncthreads();
}

struct SortKey {
  float score;
  int rank;  // -1: padding (sorts after everything)
};

__device__ __forceinline__ bool key_less(const SortKey& a, const SortKey& b) {
  if (a.rank < 0) return false;
  if (b.rank < 0) return true;
  if (bhc::score_less(a.score, b.score)) return true;
  if (bhc::score_less(b.score, a.score)) return false;
  return a.rank < b.rank;
}

// One block per (row, group) of `level`. Dynamic shared memory: 2 * d floats (centroids).
// Scratch per row: weights [n] floats, keys [2n] SortKey, tokens [n] int64 (group slices at the
// group's offset, keys at twice the offset: a group of n tokens pads to < 2n).
__global__ void __launch_bounds__(kClusterThreads)
    bhc_level_kernel(const float* __restrict__ x, const float* __restrict__ feats_n, int64_t n,
                     int64_t d, int level, int iters, float tau, float* __restrict__ weights,
                     SortKey* __restrict__ keys, int64_t* __restrict__ tokens,
                     int64_t* __restrict__ perm) {
  MMBOAT_DYNAMIC_SMEM(cent_raw);
  float* cent = reinterpret_cast<float*>(cent_raw);
  __shared__ float red[kWarp];
  const int64_t groups = int64_t(1) << level;
  const int64_t row = int64_t(blockIdx.x) / groups, group = int64_t(blockIdx.x) % groups;
  const bhc::Extent e = bhc::group_extent(n, level, group);
  const int64_t size = e.size;
  if (size < 2) return;  // block-uniform
  const float* xr = x + row * n * d;
  const float* xn = feats_n + row * n * d;
  int64_t* order = perm + row * n + e.offset;
  float* w = weights + row * n + e.offset;
  SortKey* sk = keys + row * 2 * n + 2 * e.offset;
  int64_t* tok = tokens + row * n + e.offset;
  float* c0 = cent;
  float* c1 = cent + d;
  const int64_t half = size / 2;
  // Initial centroids: means of the two rank halves.
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float a = 0.f, b = 0.f;
    for (int64_t t = 0; t < half; ++t) a += xr[order[t] * d + c];
    for (int64_t t = half; t < size; ++t) b += xr[order[t] * d + c];
    c0[c] = a * (1.0f / float(half));
    c1[c] = b * (1.0f / float(size - half));
  }
  __syncthreads();
  normalise_pair(c0, c1, d, red);
  for (int it = 0; it < iters; ++it) {
    for (int64_t t = threadIdx.x; t < size; t += blockDim.x) {
      const float* f = xn + order[t] * d;
      float s0 = 0.f, s1 = 0.f;
      for (int64_t c = 0; c < d; ++c) {
        s0 += f[c] * c0[c];
        s1 += f[c] * c1[c];
      }
      w[t] = bhc::soft_assign0(s0, s1, tau, [](float z) { return expf(z); });
    }
    __syncthreads();  // w complete; everybody is done reading c0/c1
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float a = 0.f, b = 0.f;
      for (int64_t t = 0; t < size; ++t) {
        const float xv = xr[order[t] * d + c];
        const float a0 = w[t];
        a += a0 * xv;
        b += (1.0f - a0) * xv;
      }
      c0[c] = a;
      c1[c] = b;
    }
    __syncthreads();
    normalise_pair(c0, c1, d, red);
  }
  int64_t padded = 1;
  while (padded < size) padded <<= 1;
  for (int64_t t = threadIdx.x; t < padded; t += blockDim.x) {
    SortKey k{0.f, -1};
    if (t < size) {
      const float* f = xn + order[t] * d;
      float s0 = 0.f, s1 = 0.f;
      for (int64_t c = 0; c < d; ++c) {
        s0 += f[c] * c0[c];
        s1 += f[c] * c1[c];
      }
      k.score = bhc::split_score(s0, s1);
      k.rank = int(t);
      tok[t] = order[t];
    }
    sk[t] = k;
  }
  __syncthreads();
  // Bitonic sort of sk[0, padded) ascending by key_less (a total order: stable result).
  for (int64_t len = 2; len <= padded; len <<= 1) {
    for (int64_t j = len >> 1; j > 0; j >>= 1) {
      for (int64_t i = threadIdx.x; i < padded; i += blockDim.x) {
        const int64_t p = i ^ j;
        if (p > i) {
          const bool up = (i & len) == 0;
          const SortKey a = sk[i], b = sk[p];
          if (up ? key_less(b, a) : key_less(a, b)) {
            sk[i] = b;
            sk[p] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int64_t t = threadIdx.x; t < size; t += blockDim.x) order[t] = tok[sk[t].rank];
}

__global__ void bhc_inverse_kernel(const int64_t* __restrict__ perm, int64_t tokens, int64_t n,
                                   int64_t* __restrict__ inv_perm) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int64_t row = t / n;
  inv_perm[row * n + perm[t]] = t % n;
}

// Scratch sizes (elements) for launch_bhc_cluster.
inline int64_t bhc_float_scratch(int64_t rows, int64_t n, int64_t d) {
  return rows * n * d + rows * n;  // feats_n, weights
}
inline int64_t bhc_key_scratch_bytes(int64_t rows, int64_t n) {
  return int64_t(sizeof(SortKey)) * 2 * rows * n;
}

// x: float32 [rows, n, d] contiguous. float_scratch: bhc_float_scratch floats; key_scratch:
// bhc_key_scratch_bytes bytes (aligned to 8); token_scratch: rows * n int64. Returns nullptr or
// an error message.
inline const char* launch_bhc_cluster(const float* x, int64_t rows, int64_t n, int64_t d,
                                      int64_t cluster_size, int iters, float tau,
                                      float* float_scratch, void* key_scratch,
                                      int64_t* token_scratch, int64_t* perm, int64_t* inv_perm,
                                      cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return nullptr;
  if (d <= 0) return "bhc_cluster: head_dim must be >= 1";
  if (n > (int64_t(1) << 30)) return "bhc_cluster: too many tokens for the CUDA kernel";
  const int64_t tokens = rows * n;
  float* feats_n = float_scratch;
  float* weights = float_scratch + tokens * d;
  const int64_t blocks = (tokens + 255) / 256;
  if (blocks > 0x7fffffff) return "bhc_cluster: too many tokens for the CUDA kernel";
  MMBOAT_LAUNCH(bhc_prepare_kernel, unsigned(blocks), 256, 0, stream, x, tokens, n, d, feats_n, perm);
  if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  const int levels = bhc::num_levels(n, cluster_size);
  const size_t smem = size_t(2 * d) * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(bhc_level_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem)) != cudaSuccess)
      return "bhc_cluster: head_dim too large for the CUDA kernel's shared memory";
  }
  for (int level = 0; level < levels; ++level) {
    const int64_t grid = rows << level;
    if (grid > 0x7fffffff) return "bhc_cluster: batch * heads * groups too large";
    MMBOAT_LAUNCH(bhc_level_kernel, unsigned(grid), kClusterThreads, smem, stream, 
        x, feats_n, n, d, level, iters, tau, weights, static_cast<SortKey*>(key_scratch),
        token_scratch, perm);
    if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  }
  MMBOAT_LAUNCH(bhc_inverse_kernel, unsigned(blocks), 256, 0, stream, perm, tokens, n, inv_perm);
  if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Clustered attention

struct AttnProblem {
  int64_t rows;  // batch * heads
  int64_t n;     // tokens
  int64_t d;     // head_dim
  int levels;
  int64_t overlap;
  int64_t max_keys;  // max leaf size + overlap
  float scale;
  double scale64;  // the same scale, unrounded: used by the double kernels
};

// The scale in the accumulation type A (float: p.scale; double: p.scale64).
template <typename A>
__host__ __device__ __forceinline__ A scale_of(const AttnProblem& p) {
  if constexpr (std::is_same<A, double>::value) {
    return p.scale64;
  } else {
    return p.scale;
  }
}

inline AttnProblem make_attn_problem(int64_t rows, int64_t n, int64_t d, int64_t cluster_size,
                                     int64_t overlap, double scale) {
  AttnProblem p;
  p.rows = rows;
  p.n = n;
  p.d = d;
  p.levels = bhc::num_levels(n, cluster_size);
  p.overlap = overlap;
  p.max_keys = bhc::max_leaf_size(n, p.levels) + (p.levels > 0 ? overlap : 0);
  p.scale = static_cast<float>(scale);
  p.scale64 = scale;
  return p;
}

// Shared-memory layout (acc_t elements, acc_size bytes each): ld = d + 1 (odd stride: no bank
// conflicts over keys).
//   forward:  k [K, ld], v [K, ld], per warp: q [d], p [K]
//   backward: k, v, dk, dv [K, ld], per warp: q [d], go [d], p [K], ds [K]
inline size_t attn_smem_bytes(const AttnProblem& p, bool backward,
                              size_t acc_size = sizeof(float)) {
  const int64_t ld = p.d + 1, K = p.max_keys;
  const int64_t shared = (backward ? 4 : 2) * K * ld;
  const int64_t per_warp = backward ? (2 * p.d + 2 * K) : (p.d + K);
  return size_t(shared + kAttnWarps * per_warp) * acc_size;
}

// Loads the leaf's keys/values (own tokens then overlap) as acc_t; returns the key count.
template <typename T>
__device__ __forceinline__ int64_t load_leaf_kv(const bhc::LeafKeys& lk,
                                                const int64_t* __restrict__ perm_row,
                                                const T* __restrict__ k, const T* __restrict__ v,
                                                int64_t d, int64_t ld, acc_t<T>* ks,
                                                acc_t<T>* vs) {
  const int64_t count = lk.own.size + lk.extra.size;
  for (int64_t idx = threadIdx.x; idx < count * d; idx += blockDim.x) {
    const int64_t j = idx / d, c = idx % d;
    const int64_t pos = j < lk.own.size ? lk.own.offset + j : lk.extra.offset + (j - lk.own.size);
    const int64_t tok = perm_row[pos];
    ks[j * ld + c] = to_f(k[tok * d + c]);
    vs[j * ld + c] = to_f(v[tok * d + c]);
  }
  return count;
}

template <typename A>
struct MaxSum {
  A max, sum;
};

// Logits of the query in qs (warp-local) against the leaf keys into ps; returns (max, sum) of
// exp(logit - max) and leaves ps[j] = exp(logit_j - max) (unnormalised).
template <typename A>
__device__ __forceinline__ MaxSum<A> warp_softmax(const A* qs, const A* ks, int64_t count,
                                                  int64_t d, int64_t ld, A scale, A* ps) {
  const int lane = threadIdx.x % kWarp;
  A mx = -INFINITY;
  for (int64_t j = lane; j < count; j += kWarp) {
    A s = 0;
    for (int64_t c = 0; c < d; ++c) s += qs[c] * ks[j * ld + c];
    s *= scale;
    ps[j] = s;
    mx = max_f(mx, s);
  }
  mx = warp_max(mx);
  A sum = 0;
  for (int64_t j = lane; j < count; j += kWarp) {
    const A e = exp_f(ps[j] - mx);
    ps[j] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  MMBOAT_SYNCWARP();
  return MaxSum<A>{mx, sum};
}

// What one block of the attention kernels works on (blocks run over (row, leaf)): the leaf's
// keys, the row's first token, the thread's warp and lane, and the block's shared memory, cut
// as attn_smem_bytes says, with the leaf's `count` keys and values loaded.
template <typename A>
struct LeafBlock {
  bhc::LeafKeys lk;
  int64_t base;  // row * n
  const int64_t* perm_row;
  int64_t count;
  int warp, lane;
  A *ks, *vs, *dks, *dvs;  // [K, ld] each (dks, dvs: backward, zero-filled)
  A *qs, *gos, *ps, *dss;  // this warp's q [d], go [d] (backward), p [K], ds [K] (backward)
};

// Sets the block up; a leaf without tokens of its own (b.lk.own.size == 0, block-uniform)
// loads nothing and the kernel returns. Ends with a block barrier otherwise.
template <typename T>
__device__ __forceinline__ LeafBlock<acc_t<T>> load_leaf_block(const AttnProblem& p,
                                                               const int64_t* __restrict__ perm,
                                                               const T* __restrict__ k,
                                                               const T* __restrict__ v,
                                                               unsigned char* smem,
                                                               bool backward) {
  using A = acc_t<T>;
  LeafBlock<A> b{};
  const int64_t leaves = int64_t(1) << p.levels;
  const int64_t row = int64_t(blockIdx.x) / leaves, leaf = int64_t(blockIdx.x) % leaves;
  b.lk = bhc::leaf_keys(p.n, p.levels, leaf, p.overlap);
  if (b.lk.own.size == 0) return b;
  b.base = row * p.n;
  b.perm_row = perm + b.base;
  b.warp = threadIdx.x / kWarp;
  b.lane = threadIdx.x % kWarp;
  const int64_t d = p.d, ld = d + 1, K = p.max_keys;
  A* at = reinterpret_cast<A*>(smem);
  const auto take = [&at](int64_t count) {
    A* first = at;
    at += count;
    return first;
  };
  b.ks = take(K * ld);
  b.vs = take(K * ld);
  if (backward) {
    b.dks = take(K * ld);
    b.dvs = take(K * ld);
  }
  take(b.warp * (backward ? 2 * d + 2 * K : d + K));  // the warps before
  b.qs = take(d);
  if (backward) b.gos = take(d);
  b.ps = take(K);
  if (backward) b.dss = take(K);
  b.count = load_leaf_kv(b.lk, b.perm_row, k + b.base * d, v + b.base * d, d, ld, b.ks, b.vs);
  if (backward) {
    for (int64_t idx = threadIdx.x; idx < b.count * ld; idx += blockDim.x) {
      b.dks[idx] = 0;
      b.dvs[idx] = 0;
    }
  }
  __syncthreads();
  return b;
}

template <typename T>
__global__ void __launch_bounds__(kAttnThreads)
    fsla_forward_kernel(AttnProblem p, const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const int64_t* __restrict__ perm,
                        T* __restrict__ out, T* __restrict__ lse) {
  using A = acc_t<T>;
  MMBOAT_DYNAMIC_SMEM(smem);
  const LeafBlock<A> b = load_leaf_block(p, perm, k, v, smem, false);
  if (b.lk.own.size == 0) return;  // block-uniform
  const int64_t d = p.d, ld = d + 1;
  for (int64_t t = b.warp; t < b.lk.own.size; t += kAttnWarps) {
    const int64_t tok = b.perm_row[b.lk.own.offset + t];
    const T* qt = q + (b.base + tok) * d;
    for (int64_t c = b.lane; c < d; c += kWarp) b.qs[c] = to_f(qt[c]);
    MMBOAT_SYNCWARP();
    const MaxSum<A> ms = warp_softmax(b.qs, b.ks, b.count, d, ld, scale_of<A>(p), b.ps);
    const A inv = A(1) / ms.sum;
    T* ot = out + (b.base + tok) * d;
    for (int64_t c = b.lane; c < d; c += kWarp) {
      A acc = 0;
      for (int64_t j = 0; j < b.count; ++j) acc += b.ps[j] * b.vs[j * ld + c];
      ot[c] = from_f<T>(acc * inv);
    }
    if (b.lane == 0) lse[b.base + tok] = from_f<T>(ms.max + log_f(ms.sum));
    MMBOAT_SYNCWARP();  // qs/ps are reused by the next query
  }
}

template <typename T>
__global__ void __launch_bounds__(kAttnThreads)
    fsla_backward_kernel(AttnProblem p, const T* __restrict__ grad_out, const T* __restrict__ q,
                         const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ out, const int64_t* __restrict__ perm,
                         T* __restrict__ grad_q, acc_t<T>* __restrict__ gk_acc,
                         acc_t<T>* __restrict__ gv_acc) {
  using A = acc_t<T>;
  MMBOAT_DYNAMIC_SMEM(smem);
  const LeafBlock<A> b = load_leaf_block(p, perm, k, v, smem, true);
  if (b.lk.own.size == 0) return;  // block-uniform
  const int64_t d = p.d, ld = d + 1;
  const A scale = scale_of<A>(p);
  for (int64_t t = b.warp; t < b.lk.own.size; t += kAttnWarps) {
    const int64_t tok = b.perm_row[b.lk.own.offset + t];
    const int64_t at = (b.base + tok) * d;
    A delta = 0;
    for (int64_t c = b.lane; c < d; c += kWarp) {
      b.qs[c] = to_f(q[at + c]);
      const A g = to_f(grad_out[at + c]);
      b.gos[c] = g;
      delta += g * to_f(out[at + c]);
    }
    delta = warp_sum(delta);
    MMBOAT_SYNCWARP();
    const MaxSum<A> ms = warp_softmax(b.qs, b.ks, b.count, d, ld, scale, b.ps);
    const A inv = A(1) / ms.sum;
    for (int64_t j = b.lane; j < b.count; j += kWarp) {
      A dp = 0;
      for (int64_t c = 0; c < d; ++c) dp += b.gos[c] * b.vs[j * ld + c];
      const A pj = b.ps[j] * inv;
      b.ps[j] = pj;
      b.dss[j] = pj * (dp - delta) * scale;
    }
    MMBOAT_SYNCWARP();
    for (int64_t c = b.lane; c < d; c += kWarp) {
      A acc = 0;
      const A qc = b.qs[c], gc = b.gos[c];
      for (int64_t j = 0; j < b.count; ++j) {
        const A ds = b.dss[j];
        acc += ds * b.ks[j * ld + c];
        atomicAdd(&b.dks[j * ld + c], ds * qc);
        atomicAdd(&b.dvs[j * ld + c], b.ps[j] * gc);
      }
      grad_q[at + c] = from_f<T>(acc);
    }
    MMBOAT_SYNCWARP();
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < b.count * d; idx += blockDim.x) {
    const int64_t j = idx / d, c = idx % d;
    const int64_t pos =
        j < b.lk.own.size ? b.lk.own.offset + j : b.lk.extra.offset + (j - b.lk.own.size);
    const int64_t tok = b.perm_row[pos];
    atomicAdd(&gk_acc[(b.base + tok) * d + c], b.dks[j * ld + c]);
    atomicAdd(&gv_acc[(b.base + tok) * d + c], b.dvs[j * ld + c]);
  }
}

template <typename T>
__global__ void fsla_convert_kernel(const acc_t<T>* __restrict__ src, int64_t count,
                                    T* __restrict__ dst) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) dst[i] = from_f<T>(src[i]);
}

// Sets the dynamic shared-memory size of `kernel` when it needs more than the default 48 KiB.
template <typename Kernel>
inline const char* prepare_smem(Kernel kernel, size_t smem, size_t smem_limit) {
  if (smem > smem_limit)
    return "clustered_attention: cluster_size + overlap and head_dim too large for the CUDA "
           "kernel's shared memory";
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) !=
          cudaSuccess)
    return "clustered_attention: could not raise the CUDA kernel's shared-memory limit";
  return nullptr;
}

// q/k/v/out [rows, n, d], perm [rows, n] (a permutation per row, checked by the caller),
// lse [rows, n]. smem_limit: the device's opt-in shared memory per block.
template <typename T>
const char* launch_attention_forward(const AttnProblem& p, const T* q, const T* k, const T* v,
                                     const int64_t* perm, T* out, T* lse, size_t smem_limit,
                                     cudaStream_t stream) {
  if (p.rows <= 0 || p.n <= 0 || p.d <= 0) return nullptr;
  const int64_t grid = p.rows << p.levels;
  if (grid > 0x7fffffff) return "clustered_attention: batch * heads * leaves too large";
  const size_t smem = attn_smem_bytes(p, false, sizeof(acc_t<T>));
  if (const char* err = prepare_smem(fsla_forward_kernel<T>, smem, smem_limit)) return err;
  MMBOAT_LAUNCH(fsla_forward_kernel<T>, unsigned(grid), kAttnThreads, smem, stream, p, q, k, v, perm, out,
                                                                         lse);
  if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  return nullptr;
}

// gk_acc/gv_acc: zero-filled acc_t<T> [rows, n, d] (float32; double for double). When T is
// acc_t<T> (float, double) they may alias grad_k / grad_v (then no conversion runs); otherwise
// the result is converted into grad_k / grad_v.
template <typename T>
const char* launch_attention_backward(const AttnProblem& p, const T* grad_out, const T* q,
                                      const T* k, const T* v, const T* out, const int64_t* perm,
                                      T* grad_q, acc_t<T>* gk_acc, acc_t<T>* gv_acc, T* grad_k,
                                      T* grad_v, size_t smem_limit, cudaStream_t stream) {
  if (p.rows <= 0 || p.n <= 0 || p.d <= 0) return nullptr;
  const int64_t grid = p.rows << p.levels;
  if (grid > 0x7fffffff) return "clustered_attention: batch * heads * leaves too large";
  const size_t smem = attn_smem_bytes(p, true, sizeof(acc_t<T>));
  if (const char* err = prepare_smem(fsla_backward_kernel<T>, smem, smem_limit)) return err;
  MMBOAT_LAUNCH(fsla_backward_kernel<T>, unsigned(grid), kAttnThreads, smem, stream, 
      p, grad_out, q, k, v, out, perm, grad_q, gk_acc, gv_acc);
  if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  const int64_t total = p.rows * p.n * p.d;
  const int64_t blocks = (total + 255) / 256;
  if (static_cast<void*>(gk_acc) != static_cast<void*>(grad_k)) {
    MMBOAT_LAUNCH(fsla_convert_kernel<T>, unsigned(blocks), 256, 0, stream, gk_acc, total, grad_k);
    if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  }
  if (static_cast<void*>(gv_acc) != static_cast<void*>(grad_v)) {
    MMBOAT_LAUNCH(fsla_convert_kernel<T>, unsigned(blocks), 256, 0, stream, gv_acc, total, grad_v);
    if (const char* err = MMBOAT_LAUNCH_ERROR()) return err;
  }
  return nullptr;
}

}  // namespace fsla
}  // namespace cuda
}  // namespace mmboat
