// Neighborhood attention (NA) CUDA kernels: fused forward / backward and the unfused qk / av
// ops with their backwards, for 1-D, 2-D and 3-D, in float, half and bfloat16 (float32
// accumulation, float32 log-sum-exp / delta / rpb-gradient scratch) and in double (all of it in
// double, as the CPU kernels, so float64 gradcheck can run on a GPU). The accumulation type is
// acc_t<T>. Torch-free: raw pointers and sizes; the torch launchers live in
// csrc/pytorch/cuda/neighborhood_attention_cuda.cu.
//
// ---------------------------------------------------------------------------------------------
// Geometry (docs/neighborhood_attention.md)
// * Every problem is handled as 3-D: a 1-D/2-D input is padded with leading axes of length 1,
//   kernel 1, dilation 1 (the window rule then yields the single key 0 and bias index 0 there),
//   so one code path serves na1d/na2d/na3d. Layout [B, heads, L0, L1, L2, D], contiguous.
// * Per axis, query i lives in dilation group g = i % d at inner index i' = i / d; the group has
//   Lg = ceil((L - g) / d) members. Window start (inner coordinates):
//     non-causal: s(i') = clamp(i' - k/2, 0, Lg - k), k keys;
//     causal:     s(i') = max(i' - k + 1, 0), i' - s + 1 keys (valid slots first).
//   Bias index: (key' - i') + k - 1.
//
// Inverse window (which queries see key j' of a group), used by the dK/dV/dattn-style kernels so
// that every key gathers its own gradient (deterministic, no atomics):
// * Non-causal: s(i') is non-decreasing in i', so {i' : s(i') <= j' <= s(i') + k - 1} is an
//   interval [lo, hi]. With h = k/2 and m = j' - k + 1:
//     hi = max{i' : s(i') <= j'}:      j' >= Lg - k -> every query qualifies, hi = Lg - 1;
//                                       else s(i') <= j' <=> i' - h <= j', hi = min(j' + h, Lg-1).
//     lo = min{i' : s(i') >= m}:       m <= 0 -> lo = 0; else (m <= Lg - k always holds, since
//                                       j' <= Lg - 1) s(i') >= m <=> i' - h >= m, lo = m + h.
//   It is not symmetric: at the borders a key is seen by up to k + h (left) or 2k - 1 - h (right)
//   queries, and with dilation it only relates queries and keys of the same group.
// * Causal: i' in [j', min(j' + k - 1, Lg - 1)].
//   The slot of key j' in query i''s window is j' - s(i'); kernels still test 0 <= slot < count
//   (cheap, and it makes an off-by-one in the range harmless instead of out of bounds).
//   tests/test_ops/cuda_driver checks [lo, hi] against the forward rule by brute force.
//
// Tiling of the fused forward
// * One thread block = one (batch, head) and a tile of T0 x T1 x T2 queries taken inside ONE
//   dilation group per axis (consecutive inner indices), so the union of the tile's windows is a
//   box of at most (T_a + k_a - 1) keys per axis whatever the dilation. Tile shape: up to 64
//   queries, grown round-robin over the axes (innermost first) but never beyond the group length,
//   so large dilations (short groups) still fill blocks sensibly.
// * kLanes = 4 threads cooperate on one query: lane l owns head-dim elements l, l+4, l+8, ...
//   (strided, so the 8 queries of a warp hit distinct shared-memory banks thanks to a 16-byte row
//   pad); dot products are reduced with group-masked __shfl_xor_sync.
// * Shared memory: the tile's queries (pre-scaled, acc_t) and the key/value union box, staged in
//   chunks of whole "lines" (all keys of the innermost axis for one (u0, u1)); a query walks the
//   lines of its window that fall in the chunk. Usually the whole union fits in one chunk; the
//   chunking keeps any kernel size / head_dim within the shared-memory budget. Global->shared
//   copies use 16-byte vector loads when head_dim * sizeof(T) % 16 == 0 and pointers are aligned
//   (the head_dim 32/64 fast path).
// * Online softmax in acc_t<T> (running max m, sum l, accumulator), out = acc / l, and the natural
//   log-sum-exp m + log(l) is written for the backward. Head dims larger than kLanes * DPL are
//   processed in passes over output columns (logits recomputed per pass).
//
// Backward (flash style): kernel 1, one lane group per query: delta = rowsum(dO * O) (stored),
// P = exp(s - lse), dS = P * (dO . V - delta), dQ = scale * sum dS K, and dS accumulated into
// an acc_t rpb-gradient table (block-local shared-memory table when it fits, then one global
// atomicAdd per entry and block). Kernel 2, one lane group per key: gathers the queries of its
// inverse window and accumulates dK = scale * sum dS Q and dV = sum P dO.
// The unfused ops follow the same per-query / per-key split.
//
// The window rule itself (start, count, inverse range) comes from csrc/common/
// neighborhood_attention.h, shared with the CPU kernels.
//
// Everything runs on the host too when MMBOAT_CUDA_EMULATION is defined (see
// tests/test_ops/cuda_driver/cuda_emulation.h): that is how these kernels are exercised on
// machines without a GPU.
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef MMBOAT_CUDA_EMULATION
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../neighborhood_attention.h"

#ifdef MMBOAT_CUDA_EMULATION
#define MMBOAT_DYNAMIC_SMEM(name) unsigned char* name = ::mmboat_emu::dynamic_smem()
#define MMBOAT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mmboat_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define MMBOAT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MMBOAT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#define MMBOAT_NA_HD __host__ __device__ __forceinline__

namespace mmboat {
namespace cuda {
namespace na {

constexpr int kMaxAxes = 3;
constexpr int kLanes = 4;            // threads per query (or key)
constexpr int kItemsPerBlock = 64;   // queries (keys) per block of the simple kernels
constexpr int kSimpleThreads = kLanes * kItemsPerBlock;
constexpr int kMaxTileQueries = 64;  // queries per block of the fused forward
constexpr int kMaxGridY = 65535;
constexpr int kMaxSmemRpbEntries = 4096;  // block-local rpb-gradient table (16/32 KiB)

// ------------------------------------------------------------------ dtype traits
// Accumulation (and log-sum-exp / delta / rpb-gradient) type: float, double for double.
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

template <typename T>
struct TypeTraits;
template <>
struct TypeTraits<double> {
  static MMBOAT_NA_HD double to_float(double x) { return x; }
  static MMBOAT_NA_HD double from_float(double x) { return x; }
};
template <>
struct TypeTraits<float> {
  static MMBOAT_NA_HD float to_float(float x) { return x; }
  static MMBOAT_NA_HD float from_float(float x) { return x; }
};
template <>
struct TypeTraits<__half> {
  static MMBOAT_NA_HD float to_float(__half x) { return __half2float(x); }
  static MMBOAT_NA_HD __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct TypeTraits<__nv_bfloat16> {
  static MMBOAT_NA_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static MMBOAT_NA_HD __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <typename T>
MMBOAT_NA_HD acc_t<T> to_f(T x) {
  return TypeTraits<T>::to_float(x);
}
template <typename T>
MMBOAT_NA_HD T from_f(acc_t<T> x) {
  return TypeTraits<T>::from_float(x);
}

MMBOAT_NA_HD int imin(int a, int b) { return a < b ? a : b; }
MMBOAT_NA_HD int imax(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------ window rule (one axis)
// Thin inner-coordinate wrappers over the single source of truth, csrc/common/
// neighborhood_attention.h (host+device under nvcc). In inner (dilation-group) coordinates a
// group of length lg is an axis of length lg with dilation 1, which is how they call it.
MMBOAT_NA_HD int group_length(int length, int dilation, int group) {
  return ::mmboat::na::group_length(length, dilation, group);
}
// First key (inner index) of the window of query inner index `qi` in a group of length `lg`.
MMBOAT_NA_HD int window_start(int qi, int lg, int k, bool causal) {
  return ::mmboat::na::window_start_inner(qi, lg, k, causal);
}
// Number of valid keys of that window (k unless causal).
MMBOAT_NA_HD int window_count(int qi, int start, int k, bool causal) {
  return causal ? qi - start + 1 : k;
}
// Queries (inner indices, inclusive range) whose window contains key inner index `kj`.
MMBOAT_NA_HD void inverse_window(int kj, int lg, int k, bool causal, int* lo, int* hi) {
  const ::mmboat::na::AxisRange r = ::mmboat::na::axis_inverse_range(kj, lg, k, 1, causal);
  *lo = r.first;
  *hi = r.last;
}

// ------------------------------------------------------------------ problem description
struct Problem {
  int batch = 1, heads = 1, head_dim = 1;
  int length[kMaxAxes] = {1, 1, 1};
  int kernel[kMaxAxes] = {1, 1, 1};
  int dilation[kMaxAxes] = {1, 1, 1};
  int causal[kMaxAxes] = {0, 0, 0};
  float scale = 1.f;
  int has_rpb = 0;
  // The same scale unrounded, for the double kernels (set_scale / scale64), kept as the two
  // 32-bit halves of a double: a double member would make Problem 8-byte aligned, which changes
  // the code of the float/half/bfloat16 kernels (it costs them a stack frame).
  unsigned scale64_bits[2] = {0u, 0x3ff00000u};  // 1.0

  MMBOAT_NA_HD void set_scale(double s) {
    scale = static_cast<float>(s);
    memcpy(scale64_bits, &s, sizeof(double));
  }
  MMBOAT_NA_HD double scale64() const {
    double s;
    memcpy(&s, scale64_bits, sizeof(double));
    return s;
  }

  MMBOAT_NA_HD int64_t tokens() const {
    return static_cast<int64_t>(length[0]) * length[1] * length[2];
  }
  MMBOAT_NA_HD int window_size() const { return kernel[0] * kernel[1] * kernel[2]; }
  MMBOAT_NA_HD int rpb_size() const {
    return (2 * kernel[0] - 1) * (2 * kernel[1] - 1) * (2 * kernel[2] - 1);
  }
  MMBOAT_NA_HD int bh() const { return batch * heads; }
};

// Fills `p` for an n-axis problem (n = 1..3) given per-axis arrays; axes are right-aligned.
inline Problem make_problem(int n, int batch, int heads, int head_dim, const int64_t* length,
                            const int64_t* kernel, const int64_t* dilation, const bool* causal,
                            double scale, bool has_rpb) {
  Problem p;
  p.batch = batch;
  p.heads = heads;
  p.head_dim = head_dim;
  for (int a = 0; a < n; ++a) {
    const int dst = kMaxAxes - n + a;
    p.length[dst] = static_cast<int>(length[a]);
    p.kernel[dst] = static_cast<int>(kernel[a]);
    p.dilation[dst] = static_cast<int>(dilation[a]);
    p.causal[dst] = causal[a] ? 1 : 0;
  }
  p.set_scale(scale);
  p.has_rpb = has_rpb ? 1 : 0;
  return p;
}

// The scale in the accumulation type A (float: p.scale; double: p.scale64()).
template <typename A>
MMBOAT_NA_HD A scale_of(const Problem& p) {
  if constexpr (std::is_same<A, double>::value) {
    return p.scale64();
  } else {
    return p.scale;
  }
}

// Per-axis position of one token.
struct AxisPos {
  int group, inner, group_len;
};

MMBOAT_NA_HD void decode_token(const Problem& p, int64_t n, AxisPos pos[kMaxAxes]) {
  const int x2 = static_cast<int>(n % p.length[2]);
  n /= p.length[2];
  const int x1 = static_cast<int>(n % p.length[1]);
  const int x0 = static_cast<int>(n / p.length[1]);
  const int x[kMaxAxes] = {x0, x1, x2};
#pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    pos[a].group = x[a] % p.dilation[a];
    pos[a].inner = x[a] / p.dilation[a];
    pos[a].group_len = group_length(p.length[a], p.dilation[a], pos[a].group);
  }
}

// Flat token index of inner coordinates `inner` in groups `group`.
MMBOAT_NA_HD int64_t token_index(const Problem& p, const int inner[kMaxAxes],
                              const int group[kMaxAxes]) {
  const int64_t x0 = static_cast<int64_t>(inner[0]) * p.dilation[0] + group[0];
  const int64_t x1 = static_cast<int64_t>(inner[1]) * p.dilation[1] + group[1];
  const int64_t x2 = static_cast<int64_t>(inner[2]) * p.dilation[2] + group[2];
  return (x0 * p.length[1] + x1) * p.length[2] + x2;
}

// Flat rpb-table index (within one head) of key inner `kj` seen from query inner `qi`.
MMBOAT_NA_HD int rpb_index(const Problem& p, const int kj[kMaxAxes], const int qi[kMaxAxes]) {
  const int b0 = kj[0] - qi[0] + p.kernel[0] - 1;
  const int b1 = kj[1] - qi[1] + p.kernel[1] - 1;
  const int b2 = kj[2] - qi[2] + p.kernel[2] - 1;
  return (b0 * (2 * p.kernel[1] - 1) + b1) * (2 * p.kernel[2] - 1) + b2;
}

// Window of one query, all axes.
struct QueryWindow {
  int group[kMaxAxes], inner[kMaxAxes], start[kMaxAxes], count[kMaxAxes];
};

MMBOAT_NA_HD QueryWindow query_window(const Problem& p, const AxisPos pos[kMaxAxes]) {
  QueryWindow w;
#pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    w.group[a] = pos[a].group;
    w.inner[a] = pos[a].inner;
    w.start[a] = window_start(pos[a].inner, pos[a].group_len, p.kernel[a], p.causal[a] != 0);
    w.count[a] = window_count(pos[a].inner, w.start[a], p.kernel[a], p.causal[a] != 0);
  }
  return w;
}

// ------------------------------------------------------------------ device helpers
#ifdef MMBOAT_CUDA_EMULATION
#define MMBOAT_SHFL_XOR(mask, v, o) ::mmboat_emu::shfl_xor_sync(mask, v, o)
#else
#define MMBOAT_SHFL_XOR(mask, v, o) __shfl_xor_sync(mask, v, o)
#endif

// Sum over the kLanes threads of one query/key group (groups never straddle a warp: blocks are
// multiples of 32 threads). Only the group's lanes take part, so groups may diverge.
template <typename A>
__device__ __forceinline__ A group_sum(A v) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned mask = ((1u << kLanes) - 1u) << (lane & ~static_cast<unsigned>(kLanes - 1));
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += MMBOAT_SHFL_XOR(mask, v, o);
  return v;
}

// Full-length dot product of two rows of global memory, reduced over the lane group.
template <typename T>
__device__ __forceinline__ acc_t<T> group_dot(const T* __restrict__ a, const T* __restrict__ b,
                                              int dim, int lane) {
  acc_t<T> s = 0;
  for (int i = lane; i < dim; i += kLanes) s += to_f(a[i]) * to_f(b[i]);
  return group_sum(s);
}

__device__ __forceinline__ float exp_f(float x) { return expf(x); }
__device__ __forceinline__ double exp_f(double x) { return exp(x); }
__device__ __forceinline__ float log_f(float x) { return logf(x); }
__device__ __forceinline__ double log_f(double x) { return log(x); }
__device__ __forceinline__ float max_f(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_f(double a, double b) { return fmax(a, b); }

// ============================================================================================
// Fused forward
// ============================================================================================
struct ForwardTiling {
  int tile[kMaxAxes];             // queries per block along each axis (inner coordinates)
  int tiles_per_group[kMaxAxes];  // ceil(max group length / tile)
  int tiles[kMaxAxes];            // dilation * tiles_per_group
  int union_max[kMaxAxes];        // largest union-box extent
  int lines_per_chunk;            // (u0, u1) lines of keys staged at once
  int q_stride;                   // acc_t elements per staged query row
  int kv_stride;                  // elements per staged key/value row
  int vec;                        // 16-byte vector copies allowed
  size_t kv_offset, v_offset, smem_bytes;
  int64_t blocks;
  int threads;
};

// Chooses the tiling for a shared-memory budget; returns an error message or nullptr.
// elem_size: sizeof(T); acc_size: sizeof(acc_t<T>) (the staged queries' type).
inline const char* make_forward_tiling(const Problem& p, size_t elem_size, size_t smem_budget,
                                       bool aligned16, ForwardTiling* t,
                                       size_t acc_size = sizeof(float)) {
  int max_len[kMaxAxes];
  for (int a = 0; a < kMaxAxes; ++a) {
    max_len[a] = group_length(p.length[a], p.dilation[a], 0);
    t->tile[a] = 1;
  }
  for (bool grown = true; grown;) {
    grown = false;
    for (int a = kMaxAxes - 1; a >= 0; --a) {
      const int tq = t->tile[0] * t->tile[1] * t->tile[2];
      if (t->tile[a] < max_len[a] && tq * 2 <= kMaxTileQueries) {
        t->tile[a] *= 2;
        grown = true;
      }
    }
  }
  t->blocks = p.bh();
  for (int a = 0; a < kMaxAxes; ++a) {
    t->tiles_per_group[a] = (max_len[a] + t->tile[a] - 1) / t->tile[a];
    t->tiles[a] = p.dilation[a] * t->tiles_per_group[a];
    t->union_max[a] = imin(t->tile[a] + p.kernel[a] - 1, max_len[a]);
    t->blocks *= t->tiles[a];
  }
  if (t->blocks > 2147483647LL) return "too many thread blocks for the CUDA fused forward";
  const int tile_q = t->tile[0] * t->tile[1] * t->tile[2];
  t->threads = ((tile_q * kLanes + 31) / 32) * 32;
  const int dim = p.head_dim;
  t->vec = (aligned16 && (static_cast<size_t>(dim) * elem_size) % 16 == 0) ? 1 : 0;
  t->q_stride = dim + static_cast<int>(16 / acc_size);
  t->kv_stride = dim + static_cast<int>(16 / elem_size);
  const size_t q_bytes =
      ((static_cast<size_t>(tile_q) * t->q_stride * acc_size + 15) / 16) * 16;
  const size_t line_bytes =
      ((static_cast<size_t>(t->union_max[2]) * t->kv_stride * elem_size + 15) / 16) * 16;
  const int lines = t->union_max[0] * t->union_max[1];
  if (smem_budget < q_bytes + 2 * line_bytes)
    return "head_dim is too large for the shared memory of this GPU (CUDA fused forward)";
  t->lines_per_chunk =
      imin(lines, static_cast<int>((smem_budget - q_bytes) / (2 * line_bytes)));
  t->kv_offset = q_bytes;
  t->v_offset = q_bytes + line_bytes * t->lines_per_chunk;
  t->smem_bytes = q_bytes + 2 * line_bytes * t->lines_per_chunk;
  return nullptr;
}

template <typename T, int DPL>
__global__ void __launch_bounds__(kLanes * kMaxTileQueries)
    na_fused_forward_kernel(Problem p, ForwardTiling t, const T* __restrict__ query,
                            const T* __restrict__ key, const T* __restrict__ value,
                            const T* __restrict__ rpb, T* __restrict__ out,
                            acc_t<T>* __restrict__ lse) {
  using A = acc_t<T>;
  MMBOAT_DYNAMIC_SMEM(smem);
  A* q_s = reinterpret_cast<A*>(smem);
  T* k_s = reinterpret_cast<T*>(smem + t.kv_offset);
  T* v_s = reinterpret_cast<T*>(smem + t.v_offset);
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();

  // Block -> (batch*head, tile per axis). Early exits are block-uniform.
  int64_t b = blockIdx.x;
  int tile_id[kMaxAxes];
  for (int a = kMaxAxes - 1; a >= 0; --a) {
    tile_id[a] = static_cast<int>(b % t.tiles[a]);
    b /= t.tiles[a];
  }
  const int64_t bh = b;
  int grp[kMaxAxes], lg[kMaxAxes], q0[kMaxAxes], qn[kMaxAxes], u0[kMaxAxes], un[kMaxAxes];
  #pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    grp[a] = tile_id[a] / t.tiles_per_group[a];
    lg[a] = group_length(p.length[a], p.dilation[a], grp[a]);
    q0[a] = (tile_id[a] % t.tiles_per_group[a]) * t.tile[a];
    if (q0[a] >= lg[a]) return;
    qn[a] = imin(t.tile[a], lg[a] - q0[a]);
    const bool c = p.causal[a] != 0;
    u0[a] = window_start(q0[a], lg[a], p.kernel[a], c);
    const int last = q0[a] + qn[a] - 1;
    const int u_end = c ? last : window_start(last, lg[a], p.kernel[a], c) + p.kernel[a] - 1;
    un[a] = u_end - u0[a] + 1;
  }

  const int tid = threadIdx.x;
  const int lane = tid % kLanes;
  const int tile_q = t.tile[0] * t.tile[1] * t.tile[2];
  const A scale = scale_of<A>(p);
  const T* q_bh = query + bh * n_tok * dim;
  const T* k_bh = key + bh * n_tok * dim;
  const T* v_bh = value + bh * n_tok * dim;

  // Stage the tile's queries (rows outside the valid part repeat a valid query).
  auto row_query = [&](int row, int inner[kMaxAxes]) {
    int loc2 = row % t.tile[2];
    int rest = row / t.tile[2];
    int loc[kMaxAxes] = {rest / t.tile[1], rest % t.tile[1], loc2};
    #pragma unroll
    for (int a = 0; a < kMaxAxes; ++a) inner[a] = q0[a] + imin(loc[a], qn[a] - 1);
  };
  if (t.vec) {
    constexpr int kVec = 16 / sizeof(T);
    const int nvec = dim / kVec;
    for (int e = tid; e < tile_q * nvec; e += blockDim.x) {
      const int row = e / nvec, c = (e % nvec) * kVec;
      int inner[kMaxAxes];
      row_query(row, inner);
      const int4 raw =
          *reinterpret_cast<const int4*>(q_bh + token_index(p, inner, grp) * dim + c);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) q_s[row * t.q_stride + c + i] = to_f(vals[i]) * scale;
    }
  } else {
    for (int e = tid; e < tile_q * dim; e += blockDim.x) {
      const int row = e / dim, c = e % dim;
      int inner[kMaxAxes];
      row_query(row, inner);
      q_s[row * t.q_stride + c] = to_f(q_bh[token_index(p, inner, grp) * dim + c]) * scale;
    }
  }

  // This thread's query.
  const int slot = imin(tid / kLanes, tile_q - 1);
  int loc[kMaxAxes] = {slot / (t.tile[1] * t.tile[2]), (slot / t.tile[2]) % t.tile[1],
                       slot % t.tile[2]};
  bool valid = tid / kLanes < tile_q;
  int qi[kMaxAxes], wst[kMaxAxes], wcnt[kMaxAxes], wabs[kMaxAxes];
  #pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    if (loc[a] >= qn[a]) {
      valid = false;
      loc[a] = qn[a] - 1;
    }
    qi[a] = q0[a] + loc[a];
    const bool c = p.causal[a] != 0;
    wabs[a] = window_start(qi[a], lg[a], p.kernel[a], c);
    wcnt[a] = window_count(qi[a], wabs[a], p.kernel[a], c);
    wst[a] = wabs[a] - u0[a];
  }
  const int qrow = (loc[0] * t.tile[1] + loc[1]) * t.tile[2] + loc[2];
  const A* my_q = q_s + qrow * t.q_stride;
  const T* rpb_h = p.has_rpb ? rpb + (bh % p.heads) * p.rpb_size() : nullptr;
  const int n_lines = un[0] * un[1];
  const int64_t q_tok = token_index(p, qi, grp);

  for (int base = 0; base < dim; base += kLanes * DPL) {
    A m = -INFINITY, l = 0;
    A acc[DPL];
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[j] = 0;

    for (int c0 = 0; c0 < n_lines; c0 += t.lines_per_chunk) {
      const int cl = imin(t.lines_per_chunk, n_lines - c0);
      __syncthreads();  // previous chunk (and, first time, the query stage) fully used/written
      // Stage lines [c0, c0 + cl) of the union box: row (line - c0) * un[2] + u2.
      const int rows = cl * un[2];
      if (t.vec) {
        constexpr int kVec = 16 / sizeof(T);
        const int nvec = dim / kVec;
        for (int e = tid; e < rows * nvec; e += blockDim.x) {
          const int row = e / nvec, c = (e % nvec) * kVec;
          const int line = c0 + row / un[2];
          const int inner[kMaxAxes] = {u0[0] + line / un[1], u0[1] + line % un[1],
                                       u0[2] + row % un[2]};
          const int64_t off = token_index(p, inner, grp) * dim + c;
          *reinterpret_cast<int4*>(k_s + row * t.kv_stride + c) =
              *reinterpret_cast<const int4*>(k_bh + off);
          *reinterpret_cast<int4*>(v_s + row * t.kv_stride + c) =
              *reinterpret_cast<const int4*>(v_bh + off);
        }
      } else {
        for (int e = tid; e < rows * dim; e += blockDim.x) {
          const int row = e / dim, c = e % dim;
          const int line = c0 + row / un[2];
          const int inner[kMaxAxes] = {u0[0] + line / un[1], u0[1] + line % un[1],
                                       u0[2] + row % un[2]};
          const int64_t off = token_index(p, inner, grp) * dim + c;
          k_s[row * t.kv_stride + c] = k_bh[off];
          v_s[row * t.kv_stride + c] = v_bh[off];
        }
      }
      __syncthreads();

      for (int t0 = 0; t0 < wcnt[0]; ++t0) {
        for (int t1 = 0; t1 < wcnt[1]; ++t1) {
          const int line = (wst[0] + t0) * un[1] + (wst[1] + t1);
          if (line < c0 || line >= c0 + cl) continue;  // uniform within the lane group
          const int row0 = (line - c0) * un[2] + wst[2];
          for (int t2 = 0; t2 < wcnt[2]; ++t2) {
            const T* k_row = k_s + (row0 + t2) * t.kv_stride;
            const T* v_row = v_s + (row0 + t2) * t.kv_stride;
            A s = 0;
            for (int i = lane; i < dim; i += kLanes) s += my_q[i] * to_f(k_row[i]);
            s = group_sum(s);
            if (rpb_h) {
              const int kj[kMaxAxes] = {wabs[0] + t0, wabs[1] + t1, wabs[2] + t2};
              s += to_f(rpb_h[rpb_index(p, kj, qi)]);
            }
            const A m_new = max_f(m, s);
            const A corr = exp_f(m - m_new);
            const A pr = exp_f(s - m_new);
            l = l * corr + pr;
#pragma unroll
            for (int j = 0; j < DPL; ++j) {
              const int c = base + lane + kLanes * j;
              const A vv = c < dim ? to_f(v_row[c]) : A(0);
              acc[j] = acc[j] * corr + pr * vv;
            }
            m = m_new;
          }
        }
      }
    }
    if (valid) {
      const A inv_l = A(1) / l;
      T* o = out + (bh * n_tok + q_tok) * dim;
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int c = base + lane + kLanes * j;
        if (c < dim) o[c] = from_f<T>(acc[j] * inv_l);
      }
      if (base == 0 && lane == 0) lse[bh * n_tok + q_tok] = m + log_f(l);
    }
  }
}

// ============================================================================================
// Simple per-query / per-key kernels (global-memory reads, one lane group per item)
// Grid: x over tokens (kItemsPerBlock per block), y over batch*head (grid-stride).
// ============================================================================================

// Block-local rpb-gradient table (acc_t: float32, double for double): zeroed, filled with shared
// atomics, flushed with one global atomic per non-zero entry. Falls back to global atomics when
// the table is too large.
template <typename A>
struct RpbGradAccumulator {
  A* table;  // shared or nullptr
  A* global_head;
  __device__ __forceinline__ void add(int idx, A v) {
    atomicAdd(table ? table + idx : global_head + idx, v);
  }
};

template <typename A>
__device__ __forceinline__ void rpb_table_zero(A* table, int size) {
  for (int i = threadIdx.x; i < size; i += blockDim.x) table[i] = 0;
}
template <typename A>
__device__ __forceinline__ void rpb_table_flush(const A* table, A* global_head, int size) {
  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    const A v = table[i];
    if (v != 0) atomicAdd(global_head + i, v);
  }
}

// ---------------------------------------------------------------- fused backward, part 1
template <typename T, int DPL>
__global__ void __launch_bounds__(kSimpleThreads)
    na_fused_backward_dq_kernel(Problem p, const T* __restrict__ query, const T* __restrict__ key,
                                const T* __restrict__ value, const T* __restrict__ rpb,
                                const T* __restrict__ out, const T* __restrict__ grad_out,
                                const acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ delta,
                                T* __restrict__ grad_query, acc_t<T>* __restrict__ grad_rpb,
                                int rpb_in_smem) {
  using A = acc_t<T>;
  MMBOAT_DYNAMIC_SMEM(smem);
  const A scale = scale_of<A>(p);
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  const int rsize = p.rpb_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int head = static_cast<int>(bh % p.heads);
    RpbGradAccumulator<A> acc_rpb{nullptr, grad_rpb ? grad_rpb + head * rsize : nullptr};
    if (grad_rpb && rpb_in_smem) {
      acc_rpb.table = reinterpret_cast<A*>(smem);
      rpb_table_zero(acc_rpb.table, rsize);
      __syncthreads();
    }
    if (n < n_tok) {
      AxisPos pos[kMaxAxes];
      decode_token(p, n, pos);
      const QueryWindow w = query_window(p, pos);
      const int64_t row = bh * n_tok + n;
      const T* q = query + row * dim;
      const T* dout = grad_out + row * dim;
      const A dl = group_dot(dout, out + row * dim, dim, lane);
      if (lane == 0) delta[row] = dl;
      const A lse_q = lse[row];
      const T* rpb_h = p.has_rpb ? rpb + head * rsize : nullptr;
      for (int base = 0; base < dim; base += kLanes * DPL) {
        A acc[DPL];
#pragma unroll
        for (int j = 0; j < DPL; ++j) acc[j] = 0;
        for (int t0 = 0; t0 < w.count[0]; ++t0)
          for (int t1 = 0; t1 < w.count[1]; ++t1)
            for (int t2 = 0; t2 < w.count[2]; ++t2) {
              const int kj[kMaxAxes] = {w.start[0] + t0, w.start[1] + t1, w.start[2] + t2};
              const int64_t krow = bh * n_tok + token_index(p, kj, w.group);
              const T* k = key + krow * dim;
              A s = group_dot(q, k, dim, lane) * scale;
              int ridx = 0;
              if (rpb_h) {
                ridx = rpb_index(p, kj, w.inner);
                s += to_f(rpb_h[ridx]);
              }
              const A pr = exp_f(s - lse_q);
              const A dp = group_dot(dout, value + krow * dim, dim, lane);
              const A ds = pr * (dp - dl);
#pragma unroll
              for (int j = 0; j < DPL; ++j) {
                const int c = base + lane + kLanes * j;
                if (c < dim) acc[j] += ds * to_f(k[c]);
              }
              if (grad_rpb && base == 0 && lane == 0) acc_rpb.add(ridx, ds);
            }
        T* dq = grad_query + row * dim;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int c = base + lane + kLanes * j;
          if (c < dim) dq[c] = from_f<T>(acc[j] * scale);
        }
      }
    }
    if (grad_rpb && rpb_in_smem) {
      __syncthreads();
      rpb_table_flush(acc_rpb.table, acc_rpb.global_head, rsize);
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------- fused backward, part 2
template <typename T, int DPL>
__global__ void __launch_bounds__(kSimpleThreads)
    na_fused_backward_dkdv_kernel(Problem p, const T* __restrict__ query,
                                  const T* __restrict__ key, const T* __restrict__ value,
                                  const T* __restrict__ rpb, const T* __restrict__ grad_out,
                                  const acc_t<T>* __restrict__ lse,
                                  const acc_t<T>* __restrict__ delta, T* __restrict__ grad_key,
                                  T* __restrict__ grad_value) {
  using A = acc_t<T>;
  const A scale = scale_of<A>(p);
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  if (n >= n_tok) return;
  AxisPos pos[kMaxAxes];
  decode_token(p, n, pos);
  int lo[kMaxAxes], hi[kMaxAxes], kj[kMaxAxes], grp[kMaxAxes];
  #pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    kj[a] = pos[a].inner;
    grp[a] = pos[a].group;
    inverse_window(kj[a], pos[a].group_len, p.kernel[a], p.causal[a] != 0, &lo[a], &hi[a]);
  }
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int head = static_cast<int>(bh % p.heads);
    const T* rpb_h = p.has_rpb ? rpb + head * p.rpb_size() : nullptr;
    const int64_t krow = bh * n_tok + n;
    const T* k = key + krow * dim;
    const T* v = value + krow * dim;
    for (int base = 0; base < dim; base += kLanes * DPL) {
      A dk[DPL], dv[DPL];
#pragma unroll
      for (int j = 0; j < DPL; ++j) dk[j] = dv[j] = 0;
      int qi[kMaxAxes];
      for (qi[0] = lo[0]; qi[0] <= hi[0]; ++qi[0])
        for (qi[1] = lo[1]; qi[1] <= hi[1]; ++qi[1])
          for (qi[2] = lo[2]; qi[2] <= hi[2]; ++qi[2]) {
            bool inside = true;
            #pragma unroll
            for (int a = 0; a < kMaxAxes; ++a) {
              const bool c = p.causal[a] != 0;
              const int st = window_start(qi[a], pos[a].group_len, p.kernel[a], c);
              const int slot = kj[a] - st;
              inside = inside && slot >= 0 && slot < window_count(qi[a], st, p.kernel[a], c);
            }
            if (!inside) continue;
            const int64_t qrow = bh * n_tok + token_index(p, qi, grp);
            const T* q = query + qrow * dim;
            const T* dout = grad_out + qrow * dim;
            A s = group_dot(q, k, dim, lane) * scale;
            if (rpb_h) s += to_f(rpb_h[rpb_index(p, kj, qi)]);
            const A pr = exp_f(s - lse[qrow]);
            const A dp = group_dot(dout, v, dim, lane);
            const A ds = pr * (dp - delta[qrow]);
#pragma unroll
            for (int j = 0; j < DPL; ++j) {
              const int c = base + lane + kLanes * j;
              if (c < dim) {
                dv[j] += pr * to_f(dout[c]);
                dk[j] += ds * to_f(q[c]);
              }
            }
          }
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int c = base + lane + kLanes * j;
        if (c < dim) {
          grad_key[krow * dim + c] = from_f<T>(dk[j] * scale);
          grad_value[krow * dim + c] = from_f<T>(dv[j]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- unfused qk
// attn[row, slot] = q . k + rpb (q already scaled by the caller); unused causal slots -inf.
template <typename T>
__global__ void __launch_bounds__(kSimpleThreads)
    na_qk_kernel(Problem p, const T* __restrict__ query, const T* __restrict__ key,
                 const T* __restrict__ rpb, T* __restrict__ attn) {
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  if (n >= n_tok) return;
  AxisPos pos[kMaxAxes];
  decode_token(p, n, pos);
  const QueryWindow w = query_window(p, pos);
  const int ksize = p.window_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int64_t row = bh * n_tok + n;
    const T* q = query + row * dim;
    const T* rpb_h = p.has_rpb ? rpb + (bh % p.heads) * p.rpb_size() : nullptr;
    T* a_row = attn + row * ksize;
    for (int t0 = 0; t0 < p.kernel[0]; ++t0)
      for (int t1 = 0; t1 < p.kernel[1]; ++t1)
        for (int t2 = 0; t2 < p.kernel[2]; ++t2) {
          const int slot = (t0 * p.kernel[1] + t1) * p.kernel[2] + t2;
          if (t0 >= w.count[0] || t1 >= w.count[1] || t2 >= w.count[2]) {
            if (lane == 0) a_row[slot] = from_f<T>(-INFINITY);
            continue;
          }
          const int kj[kMaxAxes] = {w.start[0] + t0, w.start[1] + t1, w.start[2] + t2};
          const int64_t krow = bh * n_tok + token_index(p, kj, w.group);
          acc_t<T> s = group_dot(q, key + krow * dim, dim, lane);
          if (rpb_h) s += to_f(rpb_h[rpb_index(p, kj, w.inner)]);
          if (lane == 0) a_row[slot] = from_f<T>(s);
        }
  }
}

// grad_query = sum_slot grad_attn * k; grad_rpb[idx] += grad_attn (acc_t table).
template <typename T, int DPL>
__global__ void __launch_bounds__(kSimpleThreads)
    na_qk_backward_dq_kernel(Problem p, const T* __restrict__ grad_attn,
                             const T* __restrict__ key, T* __restrict__ grad_query,
                             acc_t<T>* __restrict__ grad_rpb, int rpb_in_smem) {
  using A = acc_t<T>;
  MMBOAT_DYNAMIC_SMEM(smem);
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  const int rsize = p.rpb_size();
  const int ksize = p.window_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int head = static_cast<int>(bh % p.heads);
    RpbGradAccumulator<A> acc_rpb{nullptr, grad_rpb ? grad_rpb + head * rsize : nullptr};
    if (grad_rpb && rpb_in_smem) {
      acc_rpb.table = reinterpret_cast<A*>(smem);
      rpb_table_zero(acc_rpb.table, rsize);
      __syncthreads();
    }
    if (n < n_tok) {
      AxisPos pos[kMaxAxes];
      decode_token(p, n, pos);
      const QueryWindow w = query_window(p, pos);
      const int64_t row = bh * n_tok + n;
      const T* ga = grad_attn + row * ksize;
      for (int base = 0; base < dim; base += kLanes * DPL) {
        A acc[DPL];
#pragma unroll
        for (int j = 0; j < DPL; ++j) acc[j] = 0;
        for (int t0 = 0; t0 < w.count[0]; ++t0)
          for (int t1 = 0; t1 < w.count[1]; ++t1)
            for (int t2 = 0; t2 < w.count[2]; ++t2) {
              const int kj[kMaxAxes] = {w.start[0] + t0, w.start[1] + t1, w.start[2] + t2};
              const A g = to_f(ga[(t0 * p.kernel[1] + t1) * p.kernel[2] + t2]);
              const T* k = key + (bh * n_tok + token_index(p, kj, w.group)) * dim;
#pragma unroll
              for (int j = 0; j < DPL; ++j) {
                const int c = base + lane + kLanes * j;
                if (c < dim) acc[j] += g * to_f(k[c]);
              }
              if (grad_rpb && base == 0 && lane == 0) acc_rpb.add(rpb_index(p, kj, w.inner), g);
            }
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int c = base + lane + kLanes * j;
          if (c < dim) grad_query[row * dim + c] = from_f<T>(acc[j]);
        }
      }
    }
    if (grad_rpb && rpb_in_smem) {
      __syncthreads();
      rpb_table_flush(acc_rpb.table, acc_rpb.global_head, rsize);
      __syncthreads();
    }
  }
}

// Per-key gather over the inverse window: calls f(query_row, slot) for each query seeing the key.
template <typename F>
__device__ __forceinline__ void for_each_inverse_query(const Problem& p, int64_t bh,
                                                       int64_t n_tok, const AxisPos pos[kMaxAxes],
                                                       F&& f) {
  int lo[kMaxAxes], hi[kMaxAxes], kj[kMaxAxes], grp[kMaxAxes];
  #pragma unroll
  for (int a = 0; a < kMaxAxes; ++a) {
    kj[a] = pos[a].inner;
    grp[a] = pos[a].group;
    inverse_window(kj[a], pos[a].group_len, p.kernel[a], p.causal[a] != 0, &lo[a], &hi[a]);
  }
  int qi[kMaxAxes];
  for (qi[0] = lo[0]; qi[0] <= hi[0]; ++qi[0])
    for (qi[1] = lo[1]; qi[1] <= hi[1]; ++qi[1])
      for (qi[2] = lo[2]; qi[2] <= hi[2]; ++qi[2]) {
        bool inside = true;
        int t[kMaxAxes];
        #pragma unroll
        for (int a = 0; a < kMaxAxes; ++a) {
          const bool c = p.causal[a] != 0;
          const int st = window_start(qi[a], pos[a].group_len, p.kernel[a], c);
          t[a] = kj[a] - st;
          inside = inside && t[a] >= 0 && t[a] < window_count(qi[a], st, p.kernel[a], c);
        }
        if (!inside) continue;
        f(bh * n_tok + token_index(p, qi, grp), (t[0] * p.kernel[1] + t[1]) * p.kernel[2] + t[2]);
      }
}

// grad_key = sum over queries seeing the key of grad_attn[query, slot] * q.
template <typename T, int DPL>
__global__ void __launch_bounds__(kSimpleThreads)
    na_qk_backward_dk_kernel(Problem p, const T* __restrict__ grad_attn,
                             const T* __restrict__ query, T* __restrict__ grad_key) {
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  if (n >= n_tok) return;
  AxisPos pos[kMaxAxes];
  decode_token(p, n, pos);
  const int ksize = p.window_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int64_t krow = bh * n_tok + n;
    for (int base = 0; base < dim; base += kLanes * DPL) {
      acc_t<T> acc[DPL];
#pragma unroll
      for (int j = 0; j < DPL; ++j) acc[j] = 0;
      for_each_inverse_query(p, bh, n_tok, pos, [&](int64_t qrow, int slot) {
        const acc_t<T> g = to_f(grad_attn[qrow * ksize + slot]);
        const T* q = query + qrow * dim;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int c = base + lane + kLanes * j;
          if (c < dim) acc[j] += g * to_f(q[c]);
        }
      });
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int c = base + lane + kLanes * j;
        if (c < dim) grad_key[krow * dim + c] = from_f<T>(acc[j]);
      }
    }
  }
}

// ---------------------------------------------------------------- unfused av
// out = sum over valid slots attn * v.
template <typename T, int DPL>
__global__ void __launch_bounds__(kSimpleThreads)
    na_av_kernel(Problem p, const T* __restrict__ attn, const T* __restrict__ value,
                 T* __restrict__ out) {
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  if (n >= n_tok) return;
  AxisPos pos[kMaxAxes];
  decode_token(p, n, pos);
  const QueryWindow w = query_window(p, pos);
  const int ksize = p.window_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int64_t row = bh * n_tok + n;
    const T* a_row = attn + row * ksize;
    for (int base = 0; base < dim; base += kLanes * DPL) {
      acc_t<T> acc[DPL];
#pragma unroll
      for (int j = 0; j < DPL; ++j) acc[j] = 0;
      for (int t0 = 0; t0 < w.count[0]; ++t0)
        for (int t1 = 0; t1 < w.count[1]; ++t1)
          for (int t2 = 0; t2 < w.count[2]; ++t2) {
            const int kj[kMaxAxes] = {w.start[0] + t0, w.start[1] + t1, w.start[2] + t2};
            const acc_t<T> a = to_f(a_row[(t0 * p.kernel[1] + t1) * p.kernel[2] + t2]);
            const T* v = value + (bh * n_tok + token_index(p, kj, w.group)) * dim;
#pragma unroll
            for (int j = 0; j < DPL; ++j) {
              const int c = base + lane + kLanes * j;
              if (c < dim) acc[j] += a * to_f(v[c]);
            }
          }
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int c = base + lane + kLanes * j;
        if (c < dim) out[row * dim + c] = from_f<T>(acc[j]);
      }
    }
  }
}

// grad_attn[row, slot] = grad_out . v (0 for unused causal slots).
template <typename T>
__global__ void __launch_bounds__(kSimpleThreads)
    na_av_backward_dattn_kernel(Problem p, const T* __restrict__ grad_out,
                                const T* __restrict__ value, T* __restrict__ grad_attn) {
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  if (n >= n_tok) return;
  AxisPos pos[kMaxAxes];
  decode_token(p, n, pos);
  const QueryWindow w = query_window(p, pos);
  const int ksize = p.window_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int64_t row = bh * n_tok + n;
    const T* dout = grad_out + row * dim;
    T* ga = grad_attn + row * ksize;
    for (int t0 = 0; t0 < p.kernel[0]; ++t0)
      for (int t1 = 0; t1 < p.kernel[1]; ++t1)
        for (int t2 = 0; t2 < p.kernel[2]; ++t2) {
          const int slot = (t0 * p.kernel[1] + t1) * p.kernel[2] + t2;
          if (t0 >= w.count[0] || t1 >= w.count[1] || t2 >= w.count[2]) {
            if (lane == 0) ga[slot] = from_f<T>(0.f);
            continue;
          }
          const int kj[kMaxAxes] = {w.start[0] + t0, w.start[1] + t1, w.start[2] + t2};
          const acc_t<T> s =
              group_dot(dout, value + (bh * n_tok + token_index(p, kj, w.group)) * dim, dim, lane);
          if (lane == 0) ga[slot] = from_f<T>(s);
        }
  }
}

// grad_value = sum over queries seeing the value of attn[query, slot] * grad_out.
template <typename T, int DPL>
__global__ void __launch_bounds__(kSimpleThreads)
    na_av_backward_dv_kernel(Problem p, const T* __restrict__ attn,
                             const T* __restrict__ grad_out, T* __restrict__ grad_value) {
  const int dim = p.head_dim;
  const int64_t n_tok = p.tokens();
  const int lane = threadIdx.x % kLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x / kLanes;
  if (n >= n_tok) return;
  AxisPos pos[kMaxAxes];
  decode_token(p, n, pos);
  const int ksize = p.window_size();
  for (int64_t bh = blockIdx.y; bh < p.bh(); bh += gridDim.y) {
    const int64_t vrow = bh * n_tok + n;
    for (int base = 0; base < dim; base += kLanes * DPL) {
      acc_t<T> acc[DPL];
#pragma unroll
      for (int j = 0; j < DPL; ++j) acc[j] = 0;
      for_each_inverse_query(p, bh, n_tok, pos, [&](int64_t qrow, int slot) {
        const acc_t<T> a = to_f(attn[qrow * ksize + slot]);
        const T* dout = grad_out + qrow * dim;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int c = base + lane + kLanes * j;
          if (c < dim) acc[j] += a * to_f(dout[c]);
        }
      });
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int c = base + lane + kLanes * j;
        if (c < dim) grad_value[vrow * dim + c] = from_f<T>(acc[j]);
      }
    }
  }
}

// ============================================================================================
// Host launchers (torch-free). Each returns nullptr or an error message; CUDA launch errors are
// left for the caller to check (cudaGetLastError / C10_CUDA_KERNEL_LAUNCH_CHECK).
// ============================================================================================
#define MMBOAT_NA_DISPATCH_DPL(dim, ...) \
  do {                                   \
    if ((dim) <= 16) {                   \
      constexpr int kDPL = 4;            \
      __VA_ARGS__;                       \
    } else if ((dim) <= 32) {            \
      constexpr int kDPL = 8;            \
      __VA_ARGS__;                       \
    } else if ((dim) <= 64) {            \
      constexpr int kDPL = 16;           \
      __VA_ARGS__;                       \
    } else {                             \
      constexpr int kDPL = 32;           \
      __VA_ARGS__;                       \
    }                                    \
  } while (0)

inline dim3 simple_grid(const Problem& p) {
  const int64_t bx = (p.tokens() + kItemsPerBlock - 1) / kItemsPerBlock;
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(imin(p.bh(), kMaxGridY)), 1);
}

inline const char* check_simple_grid(const Problem& p) {
  if ((p.tokens() + kItemsPerBlock - 1) / kItemsPerBlock > 2147483647LL)
    return "too many tokens for the CUDA neighborhood-attention kernels";
  return nullptr;
}

template <typename T>
const char* launch_fused_forward(const Problem& p, const T* query, const T* key, const T* value,
                                 const T* rpb, T* out, acc_t<T>* lse, size_t smem_budget,
                                 cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(query) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(key) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(value) % 16 == 0);
  ForwardTiling t;
  if (const char* err =
          make_forward_tiling(p, sizeof(T), smem_budget, aligned, &t, sizeof(acc_t<T>)))
    return err;
  MMBOAT_NA_DISPATCH_DPL(p.head_dim, {
    auto kernel = &na_fused_forward_kernel<T, kDPL>;
    if (t.smem_bytes > 48 * 1024)
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(t.smem_bytes));
    MMBOAT_LAUNCH(kernel, dim3(static_cast<unsigned>(t.blocks)), dim3(t.threads), t.smem_bytes,
                  stream, p, t, query, key, value, rpb, out, lse);
  });
  return nullptr;
}

// lse: acc_t<T> [B*heads*N]; grad_rpb: acc_t<T> [heads, rpb_size] zero-filled scratch or
// nullptr; delta: acc_t<T> [B*heads*N] scratch. (acc_t: float32, double for double.)
template <typename T>
const char* launch_fused_backward(const Problem& p, const T* grad_out, const T* query,
                                  const T* key, const T* value, const T* rpb, const T* out,
                                  const acc_t<T>* lse, acc_t<T>* delta, T* grad_query,
                                  T* grad_key, T* grad_value, acc_t<T>* grad_rpb,
                                  cudaStream_t stream) {
  if (const char* err = check_simple_grid(p)) return err;
  const dim3 grid = simple_grid(p);
  const int smem_rpb = (grad_rpb && p.rpb_size() <= kMaxSmemRpbEntries) ? 1 : 0;
  const size_t smem = smem_rpb ? p.rpb_size() * sizeof(acc_t<T>) : 0;
  MMBOAT_NA_DISPATCH_DPL(p.head_dim, {
    auto k1 = &na_fused_backward_dq_kernel<T, kDPL>;
    MMBOAT_LAUNCH(k1, grid, dim3(kSimpleThreads), smem, stream, p, query, key, value, rpb, out,
                  grad_out, lse, delta, grad_query, grad_rpb, smem_rpb);
    auto k2 = &na_fused_backward_dkdv_kernel<T, kDPL>;
    MMBOAT_LAUNCH(k2, grid, dim3(kSimpleThreads), 0, stream, p, query, key, value, rpb, grad_out,
                  lse, static_cast<const acc_t<T>*>(delta), grad_key, grad_value);
  });
  return nullptr;
}

// attn: [B*heads*N, window_size].
template <typename T>
const char* launch_qk(const Problem& p, const T* query, const T* key, const T* rpb, T* attn,
                      cudaStream_t stream) {
  if (const char* err = check_simple_grid(p)) return err;
  auto kernel = &na_qk_kernel<T>;
  MMBOAT_LAUNCH(kernel, simple_grid(p), dim3(kSimpleThreads), 0, stream, p, query, key, rpb,
                attn);
  return nullptr;
}

template <typename T>
const char* launch_qk_backward(const Problem& p, const T* grad_attn, const T* query,
                               const T* key, T* grad_query, T* grad_key,
                               acc_t<T>* grad_rpb, cudaStream_t stream) {
  if (const char* err = check_simple_grid(p)) return err;
  const dim3 grid = simple_grid(p);
  const int smem_rpb = (grad_rpb && p.rpb_size() <= kMaxSmemRpbEntries) ? 1 : 0;
  const size_t smem = smem_rpb ? p.rpb_size() * sizeof(acc_t<T>) : 0;
  MMBOAT_NA_DISPATCH_DPL(p.head_dim, {
    auto k1 = &na_qk_backward_dq_kernel<T, kDPL>;
    MMBOAT_LAUNCH(k1, grid, dim3(kSimpleThreads), smem, stream, p, grad_attn, key, grad_query,
                  grad_rpb, smem_rpb);
    auto k2 = &na_qk_backward_dk_kernel<T, kDPL>;
    MMBOAT_LAUNCH(k2, grid, dim3(kSimpleThreads), 0, stream, p, grad_attn, query, grad_key);
  });
  return nullptr;
}

template <typename T>
const char* launch_av(const Problem& p, const T* attn, const T* value, T* out,
                      cudaStream_t stream) {
  if (const char* err = check_simple_grid(p)) return err;
  MMBOAT_NA_DISPATCH_DPL(p.head_dim, {
    auto kernel = &na_av_kernel<T, kDPL>;
    MMBOAT_LAUNCH(kernel, simple_grid(p), dim3(kSimpleThreads), 0, stream, p, attn, value, out);
  });
  return nullptr;
}

template <typename T>
const char* launch_av_backward(const Problem& p, const T* grad_out, const T* attn,
                               const T* value, T* grad_attn, T* grad_value,
                               cudaStream_t stream) {
  if (const char* err = check_simple_grid(p)) return err;
  const dim3 grid = simple_grid(p);
  auto k1 = &na_av_backward_dattn_kernel<T>;
  MMBOAT_LAUNCH(k1, grid, dim3(kSimpleThreads), 0, stream, p, grad_out, value, grad_attn);
  MMBOAT_NA_DISPATCH_DPL(p.head_dim, {
    auto k2 = &na_av_backward_dv_kernel<T, kDPL>;
    MMBOAT_LAUNCH(k2, grid, dim3(kSimpleThreads), 0, stream, p, attn, grad_out, grad_value);
  });
  return nullptr;
}

}  // namespace na
}  // namespace cuda
}  // namespace mmboat
