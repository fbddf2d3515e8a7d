// Clustered attention (BOAT FSLA), CPU kernels (torch-free: raw pointers, sizes and a thread
// pool passed in). The torch launcher, argument checks and op registration live in
// csrc/pytorch/cpu/feature_space_attention_cpu.cpp; the leaf layout (own tokens plus the sibling
// overlap) in ../balanced_clustering.h (shared with the CUDA kernels).
//
// The forward runs over (sample * head, leaf) tasks and the backward over (sample * head,
// sibling pair) tasks (leaves 2j and 2j + 1 read each other's keys), so no two tasks write the
// same token. A leaf's keys and values are gathered once; each of its queries then takes its
// logits, an exact softmax and the weighted sum (backward: p from the saved log-sum-exp, dQ per
// query, dK / dV of the leaf accumulated and added once). float with head_dim 8, 16, ..., 64 runs
// AVX2+FMA kernels (templates on head_dim / 8, rows in registers, logits of 8 keys reduced
// together, the polynomial exp of avx2_math.h); everything else runs the generic loops (float64
// in float64), whose AVX2 instance is the same code vectorised by the compiler (same bits).
//
// Threads: `par` as in neighborhood_attention_kernels.h (par.for_range).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "balanced_clustering.h"
#include "cpu/avx2_math.h"

namespace mmboat {
namespace cpu {
namespace fsla {

using ::mmboat::bhc::LeafKeys;

// The first row of perm ([rows, n]) that is not a permutation of 0..n-1, or -1 when every row
// is one (the kernels below would read out of range or race otherwise).
template <class Parallel>
int64_t first_non_permutation_row(const Parallel& par, const int64_t* perm, int64_t rows,
                                  int64_t n) {
  std::atomic<int64_t> bad_row{-1};
  par.for_range(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> seen(n);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t v = perm[row * n + t];
        if (v < 0 || v >= n || seen[v]) {
          bad_row.store(row);
          break;
        }
        seen[v] = 1;
      }
    }
  });
  return bad_row.load();
}

template <typename T>
struct LeafBuffers {
  std::vector<int64_t> key_tokens;  // [K]
  std::vector<T> k_t, v_t;          // [d, K] (transposed: vectorise over keys)
  std::vector<T> k_r, v_r;          // [K, d] (vectorise over channels)
  std::vector<T> p, dp;             // [K]
  std::vector<T> dk, dv;            // [K, d]

  // Gathers the leaf's keys (own tokens, then the sibling overlap) from raster order.
  // The forward needs k_t and v_r, the backward all four; the AVX2 kernels (keys_by_row) k_r
  // and v_r, zero-padded to a multiple of 8 keys.
  int64_t load(const int64_t* perm_row, const LeafKeys& keys, const T* k, const T* v, int64_t d,
               bool backward, bool keys_by_row = false) {
    const int64_t count = keys.own.size + keys.extra.size;
    key_tokens.resize(count);
    for (int64_t j = 0; j < keys.own.size; ++j) key_tokens[j] = perm_row[keys.own.offset + j];
    for (int64_t j = 0; j < keys.extra.size; ++j)
      key_tokens[keys.own.size + j] = perm_row[keys.extra.offset + j];
    k_t.resize(d * count);
    v_r.resize(count * d);
    p.resize(count);
    dp.resize(std::max(count, d));
    if (backward) {
      v_t.resize(d * count);
      k_r.resize(count * d);
    }
    if (keys_by_row) {
      const int64_t padded = (count + 7) & ~int64_t(7);
      k_r.resize(padded * d);
      v_r.resize(padded * d);
      std::fill(k_r.begin() + count * d, k_r.end(), T(0));
      std::fill(v_r.begin() + count * d, v_r.end(), T(0));
      p.resize(padded);
      dp.resize(std::max(padded, d));
      for (int64_t j = 0; j < count; ++j) {
        std::copy(k + key_tokens[j] * d, k + (key_tokens[j] + 1) * d, k_r.data() + j * d);
        std::copy(v + key_tokens[j] * d, v + (key_tokens[j] + 1) * d, v_r.data() + j * d);
      }
      return count;
    }
    for (int64_t j = 0; j < count; ++j) {
      const T* kj = k + key_tokens[j] * d;
      const T* vj = v + key_tokens[j] * d;
      for (int64_t c = 0; c < d; ++c) k_t[c * count + j] = kj[c];
      std::copy(vj, vj + d, v_r.data() + j * d);
      if (backward) {
        for (int64_t c = 0; c < d; ++c) v_t[c * count + j] = vj[c];
        std::copy(kj, kj + d, k_r.data() + j * d);
      }
    }
    return count;
  }
};

// exp that vectorises (Cody-Waite reduction, degree-7 Taylor, ~1 ulp for x in [-87, 0]);
// double keeps std::exp. Arguments are logits minus their row maximum (<= 0); below -87 the
// result is clamped near 2^-126 (negligible next to the row maximum's 1). The clamp is on the
// integer exponent: a float compare would block vectorisation under -ftrapping-math.
MMBOAT_INLINE float softmax_exp(float x) {
  const float r = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float f = (x - r * 0.693145752f) - r * 1.42860677e-06f;     // |f| <= ln2 / 2
  float p = 1.98412698e-04f;
  p = p * f + 1.38888889e-03f;
  p = p * f + 8.33333333e-03f;
  p = p * f + 4.16666667e-02f;
  p = p * f + 1.66666667e-01f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t e = static_cast<int32_t>(r);
  e = e < -126 ? -126 : e;
  const int32_t bits = (e + 127) << 23;
  float two_r;
  std::memcpy(&two_r, &bits, sizeof(float));
  return p * two_r;
}
MMBOAT_INLINE double softmax_exp(double x) { return std::exp(x); }

// s[j] = sum_c a[c] * m_t[c, j] for the K keys (vectorised over keys).
template <typename T>
MMBOAT_INLINE void dots_with_keys(const T* a, const T* m_t, int64_t d, int64_t count, T* s) {
  if (count <= 0) return;  // (also tells GCC the fill size is positive: no -Wstringop-overflow)
  std::fill(s, s + count, T(0));
  for (int64_t c = 0; c < d; ++c) {
    const T ac = a[c];
    const T* row = m_t + c * count;
    for (int64_t j = 0; j < count; ++j) s[j] += ac * row[j];
  }
}

// Sum with 8 independent partial sums (a plain loop is latency bound under strict FP).
template <typename T>
MMBOAT_INLINE T blocked_sum(const T* x, int64_t n) {
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[j + l];
  T sum = 0;
  for (; j < n; ++j) sum += x[j];
  for (int l = 0; l < 8; ++l) sum += part[l];
  return sum;
}

// Maximum with 8 independent lanes (selects, so it vectorises).
template <typename T>
MMBOAT_INLINE T blocked_max(const T* x, int64_t n) {
  T part[8];
  for (int l = 0; l < 8; ++l) part[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) part[l] = x[j + l] > part[l] ? x[j + l] : part[l];
  T mx = -std::numeric_limits<T>::infinity();
  for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  for (int l = 0; l < 8; ++l) mx = part[l] > mx ? part[l] : mx;
  return mx;
}

// Leaf kernels: one signature for the generic and the AVX2 ones (the AVX2 ones take d from
// their template). Forward: out and lse of the leaf's own queries; backward: their grad_q, and
// the leaf's contributions added to grad_k and grad_v.
template <typename T>
using ForwardLeaf = void (*)(const T* q, const int64_t* perm_row, const LeafKeys& keys, int64_t d,
                             T scale, LeafBuffers<T>& buf, T* out, T* lse);
template <typename T>
using BackwardLeaf = void (*)(const T* q, const T* grad_out, const T* out, const T* lse,
                              const int64_t* perm_row, const LeafKeys& keys, int64_t d, T scale,
                              LeafBuffers<T>& buf, T* grad_q, T* grad_k, T* grad_v);

// The generic forward leaf (keys transposed in buf.k_t, values by row in buf.v_r).
template <typename T>
MMBOAT_INLINE void attention_forward_leaf(const T* q, const int64_t* perm_row,
                                          const LeafKeys& keys, int64_t d, T scale,
                                          LeafBuffers<T>& buf, T* out, T* lse) {
  const int64_t count = static_cast<int64_t>(buf.key_tokens.size());
  T* p = buf.p.data();
  T* acc = buf.dp.data();  // [d] output accumulator (dp is free in the forward)
  for (int64_t t = 0; t < keys.own.size; ++t) {
    const int64_t tok = perm_row[keys.own.offset + t];
    dots_with_keys(q + tok * d, buf.k_t.data(), d, count, p);
    for (int64_t j = 0; j < count; ++j) p[j] *= scale;
    const T mx = blocked_max(p, count);
    for (int64_t j = 0; j < count; ++j) p[j] = softmax_exp(p[j] - mx);
    const T sum = blocked_sum(p, count);
    const T inv = T(1) / sum;
    std::fill(acc, acc + d, T(0));
    for (int64_t j = 0; j < count; ++j) {
      const T w = p[j];
      const T* vj = buf.v_r.data() + j * d;
      for (int64_t c = 0; c < d; ++c) acc[c] += w * vj[c];
    }
    T* o = out + tok * d;
    for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
    lse[tok] = mx + std::log(sum);
  }
}

// The generic backward leaf (keys and values both transposed and by row in buf).
template <typename T>
MMBOAT_INLINE void attention_backward_leaf(const T* q, const T* grad_out, const T* out,
                                           const T* lse, const int64_t* perm_row,
                                           const LeafKeys& keys, int64_t d, T scale,
                                           LeafBuffers<T>& buf, T* grad_q, T* grad_k, T* grad_v) {
  const int64_t count = static_cast<int64_t>(buf.key_tokens.size());
  buf.dk.assign(count * d, T(0));
  buf.dv.assign(count * d, T(0));
  T* p = buf.p.data();
  T* dp = buf.dp.data();
  for (int64_t t = 0; t < keys.own.size; ++t) {
    const int64_t tok = perm_row[keys.own.offset + t];
    const T* qt = q + tok * d;
    const T* dot_ = grad_out + tok * d;
    const T* ot = out + tok * d;
    dots_with_keys(qt, buf.k_t.data(), d, count, p);
    dots_with_keys(dot_, buf.v_t.data(), d, count, dp);
    T delta = 0;
    for (int64_t c = 0; c < d; ++c) delta += dot_[c] * ot[c];
    const T l = lse[tok];
    for (int64_t j = 0; j < count; ++j) p[j] = softmax_exp(p[j] * scale - l);
    T* gq = grad_q + tok * d;
    std::fill(gq, gq + d, T(0));
    for (int64_t j = 0; j < count; ++j) {
      const T pj = p[j];
      const T ds = pj * (dp[j] - delta) * scale;
      const T* kj = buf.k_r.data() + j * d;
      T* dkj = buf.dk.data() + j * d;
      T* dvj = buf.dv.data() + j * d;
      for (int64_t c = 0; c < d; ++c) {
        gq[c] += ds * kj[c];
        dkj[c] += ds * qt[c];
        dvj[c] += pj * dot_[c];
      }
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    T* gk = grad_k + buf.key_tokens[j] * d;
    T* gv = grad_v + buf.key_tokens[j] * d;
    const T* dkj = buf.dk.data() + j * d;
    const T* dvj = buf.dv.data() + j * d;
    for (int64_t c = 0; c < d; ++c) {
      gk[c] += dkj[c];
      gv[c] += dvj[c];
    }
  }
}

#if MMBOAT_X86
// Logits of one query row (qv) with 8 keys by row from kj: lane r = key r.
template <int NC>
MMBOAT_AVX2 inline __m256 dots8(const __m256* qv, const float* kj) {
  constexpr int64_t d = 8 * NC;
  __m256 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj + r * d));
  for (int c = 1; c < NC; ++c)
    for (int r = 0; r < 8; ++r)
      a[r] = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kj + r * d + 8 * c), a[r]);
  return simd::hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
}

// attention_forward_leaf for float, d = 8 * NC: logits of 8 keys at a time (keys by row, dot
// products reduced together), exp on 8 lanes, the output row in registers.
template <int NC>
MMBOAT_AVX2 void attention_forward_leaf_avx2(const float* q, const int64_t* perm_row,
                                             const LeafKeys& keys, int64_t /*d = 8 * NC*/,
                                             float scale, LeafBuffers<float>& buf, float* out,
                                             float* lse) {
  constexpr int64_t d = 8 * NC;
  const int64_t count = static_cast<int64_t>(buf.key_tokens.size());
  const int64_t padded = (count + 7) & ~int64_t(7);
  const float* kr = buf.k_r.data();
  const float* vr = buf.v_r.data();
  float* p = buf.p.data();
  const __m256 scale_v = _mm256_set1_ps(scale);
  for (int64_t t = 0; t < keys.own.size; ++t) {
    const int64_t tok = perm_row[keys.own.offset + t];
    __m256 qv[NC];
    for (int c = 0; c < NC; ++c) qv[c] = _mm256_loadu_ps(q + tok * d + 8 * c);
    __m256 mx_v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < padded; j += 8) {
      const __m256 s = _mm256_mul_ps(dots8<NC>(qv, kr + j * d), scale_v);
      _mm256_storeu_ps(p + j, s);
      if (j + 8 <= count) mx_v = _mm256_max_ps(mx_v, s);
    }
    float mx = -std::numeric_limits<float>::infinity();
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx_v);
    for (int r = 0; r < 8; ++r) mx = lanes[r] > mx ? lanes[r] : mx;
    for (int64_t j = count & ~int64_t(7); j < count; ++j) mx = p[j] > mx ? p[j] : mx;
    const __m256 shift = _mm256_set1_ps(mx);
    for (int64_t j = 0; j < padded; j += 8)
      _mm256_storeu_ps(p + j, simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), shift)));
    __m256 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
    float sum = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      sum += p[j];
      const __m256 w = _mm256_broadcast_ss(p + j);
      for (int c = 0; c < NC; ++c)
        acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + j * d + 8 * c), acc[c]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int c = 0; c < NC; ++c)
      _mm256_storeu_ps(out + tok * d + 8 * c, _mm256_mul_ps(acc[c], inv));
    lse[tok] = mx + std::log(sum);
  }
}

// attention_backward_leaf for float, d = 8 * NC: p and dO.v for 8 keys at a time, dQ in
// registers, dK / dV rows of the leaf accumulated in buf and added to the gradients once.
template <int NC>
MMBOAT_AVX2 void attention_backward_leaf_avx2(const float* q, const float* grad_out,
                                              const float* out, const float* lse,
                                              const int64_t* perm_row, const LeafKeys& keys,
                                              int64_t /*d = 8 * NC*/, float scale,
                                              LeafBuffers<float>& buf, float* grad_q,
                                              float* grad_k, float* grad_v) {
  constexpr int64_t d = 8 * NC;
  const int64_t count = static_cast<int64_t>(buf.key_tokens.size());
  const int64_t padded = (count + 7) & ~int64_t(7);
  buf.dk.assign(count * d, 0.f);
  buf.dv.assign(count * d, 0.f);
  const float* kr = buf.k_r.data();
  const float* vr = buf.v_r.data();
  float* p = buf.p.data();
  float* dp = buf.dp.data();
  float* dk = buf.dk.data();
  float* dv = buf.dv.data();
  const __m256 scale_v = _mm256_set1_ps(scale);
  for (int64_t t = 0; t < keys.own.size; ++t) {
    const int64_t tok = perm_row[keys.own.offset + t];
    __m256 qv[NC], gv[NC], acc = _mm256_setzero_ps();
    for (int c = 0; c < NC; ++c) {
      qv[c] = _mm256_loadu_ps(q + tok * d + 8 * c);
      gv[c] = _mm256_loadu_ps(grad_out + tok * d + 8 * c);
      acc = _mm256_fmadd_ps(gv[c], _mm256_loadu_ps(out + tok * d + 8 * c), acc);
    }
    const float delta = simd::hsum1(acc);
    const __m256 l = _mm256_set1_ps(lse[tok]);
    for (int64_t j = 0; j < padded; j += 8) {
      _mm256_storeu_ps(p + j, simd::exp8(_mm256_fmsub_ps(dots8<NC>(qv, kr + j * d), scale_v, l)));
      _mm256_storeu_ps(dp + j, dots8<NC>(gv, vr + j * d));
    }
    __m256 gq[NC];
    for (int c = 0; c < NC; ++c) gq[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
      const float pj = p[j];
      const __m256 ds = _mm256_set1_ps(pj * (dp[j] - delta) * scale);
      const __m256 pv = _mm256_set1_ps(pj);
      for (int c = 0; c < NC; ++c) {
        const int64_t at = j * d + 8 * c;
        gq[c] = _mm256_fmadd_ps(ds, _mm256_loadu_ps(kr + at), gq[c]);
        _mm256_storeu_ps(dk + at, _mm256_fmadd_ps(ds, qv[c], _mm256_loadu_ps(dk + at)));
        _mm256_storeu_ps(dv + at, _mm256_fmadd_ps(pv, gv[c], _mm256_loadu_ps(dv + at)));
      }
    }
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(grad_q + tok * d + 8 * c, gq[c]);
  }
  for (int64_t j = 0; j < count; ++j) {
    float* gk = grad_k + buf.key_tokens[j] * d;
    float* gvj = grad_v + buf.key_tokens[j] * d;
    for (int c = 0; c < NC; ++c) {
      _mm256_storeu_ps(gk + 8 * c, _mm256_add_ps(_mm256_loadu_ps(gk + 8 * c),
                                                 _mm256_loadu_ps(dk + j * d + 8 * c)));
      _mm256_storeu_ps(gvj + 8 * c, _mm256_add_ps(_mm256_loadu_ps(gvj + 8 * c),
                                                  _mm256_loadu_ps(dv + j * d + 8 * c)));
    }
  }
}

#endif

// The AVX2 leaf instances for head dims 8, 16, ..., 64 (float only).
template <typename T>
struct Avx2Leaves {
  static constexpr ForwardLeaf<T> forward[8] = {};
  static constexpr BackwardLeaf<T> backward[8] = {};
};
#if MMBOAT_X86
template <>
struct Avx2Leaves<float> {
  static constexpr ForwardLeaf<float> forward[8] = MMBOAT_NC_TABLE(attention_forward_leaf_avx2);
  static constexpr BackwardLeaf<float> backward[8] =
      MMBOAT_NC_TABLE(attention_backward_leaf_avx2);
};
#endif

// The leaf kernel for head dim d: the AVX2 one from `avx2` where there is one and the CPU runs
// it (it reads the keys by row: *keys_by_row), else the generic one (its baseline or AVX2
// instance).
template <auto Generic>
decltype(Generic) pick_leaf(int64_t d, const decltype(Generic) (&avx2)[8], bool* keys_by_row) {
  const decltype(Generic) fast = simd::pick_avx2(d, avx2);
  *keys_by_row = fast != nullptr;
  return fast ? fast : simd::generic_instance<Generic>();
}

// out and lse ([rows, n, d] and [rows, n]) of attention within the leaves of perm ([rows, n],
// every row a permutation), cluster size m, sibling overlap o.
template <typename T, class Parallel>
void clustered_attention_forward(const Parallel& par, const T* q, const T* k, const T* v,
                                 const int64_t* perm, int64_t rows, int64_t n, int64_t d,
                                 int64_t cluster_size, int64_t overlap, T scale, T* out, T* lse) {
  const int levels = bhc::num_levels(n, cluster_size);
  const int64_t leaves = int64_t(1) << levels;
  bool keys_by_row = false;
  const ForwardLeaf<T> leaf_kernel =
      pick_leaf<&attention_forward_leaf<T>>(d, Avx2Leaves<T>::forward, &keys_by_row);
  par.for_range(0, rows * leaves, 1, [&](int64_t begin, int64_t end) {
    LeafBuffers<T> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / leaves, leaf = task % leaves;
      const LeafKeys keys = bhc::leaf_keys(n, levels, leaf, overlap);
      if (keys.own.size == 0) continue;
      const int64_t base = row * n;
      const int64_t* perm_row = perm + base;
      // Token buffers are row-relative: shift the raster pointers to this row.
      buf.load(perm_row, keys, k + base * d, v + base * d, d, false, keys_by_row);
      leaf_kernel(q + base * d, perm_row, keys, d, scale, buf, out + base * d, lse + base);
    }
  });
}

// Gradients of clustered_attention_forward; grad_q, grad_k and grad_v must be zero-filled.
template <typename T, class Parallel>
void clustered_attention_backward(const Parallel& par, const T* grad_out, const T* q, const T* k,
                                  const T* v, const T* out, const T* lse, const int64_t* perm,
                                  int64_t rows, int64_t n, int64_t d, int64_t cluster_size,
                                  int64_t overlap, T scale, T* grad_q, T* grad_k, T* grad_v) {
  const int levels = bhc::num_levels(n, cluster_size);
  const int64_t leaves = int64_t(1) << levels;
  // Leaves 2j and 2j+1 read each other's keys: one task per sibling pair.
  const int64_t per_task = levels > 0 ? 2 : 1;
  const int64_t tasks = leaves / per_task;
  bool keys_by_row = false;
  const BackwardLeaf<T> leaf_kernel =
      pick_leaf<&attention_backward_leaf<T>>(d, Avx2Leaves<T>::backward, &keys_by_row);
  par.for_range(0, rows * tasks, 1, [&](int64_t begin, int64_t end) {
    LeafBuffers<T> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / tasks, pair = task % tasks;
      const int64_t base = row * n;
      const int64_t* perm_row = perm + base;
      for (int64_t leaf = pair * per_task; leaf < (pair + 1) * per_task; ++leaf) {
        const LeafKeys keys = bhc::leaf_keys(n, levels, leaf, overlap);
        if (keys.own.size == 0) continue;
        buf.load(perm_row, keys, k + base * d, v + base * d, d, !keys_by_row, keys_by_row);
        leaf_kernel(q + base * d, grad_out + base * d, out + base * d, lse + base, perm_row,
                    keys, d, scale, buf, grad_q + base * d, grad_k + base * d,
                    grad_v + base * d);
      }
    }
  });
}

}  // namespace fsla
}  // namespace cpu
}  // namespace mmboat
