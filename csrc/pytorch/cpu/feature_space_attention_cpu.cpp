// CPU kernels of the FSLA ops (BOAT): balanced hierarchical clustering and clustered attention.
// Layout rule and per-token formulas: csrc/common/balanced_clustering.h. Parallel (ATen/OpenMP)
// over (sample * head, group) per clustering level, over (sample * head, leaf) in the attention
// forward and over (sample * head, sibling pair) in the backward, so no two tasks write the same
// token.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "balanced_clustering.h"
#include "checks.h"
#include "feature_space_attention.h"

namespace mmboat {
namespace fsla {
namespace {

using bhc::Extent;
using bhc::LeafKeys;

// ---------------------------------------------------------------------------------------------
// Clustering

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
// Hot loops get an AVX2 clone chosen at load time (the build targets baseline x86-64).
#define MMBOAT_FSLA_HOT __attribute__((target_clones("avx2", "default")))
#else
#define MMBOAT_FSLA_HOT
#endif

struct SplitScratch {
  std::vector<float> centroids;  // [2, d]
  std::vector<float> feats_t;    // [d, n]: normalised features of the group, transposed
  std::vector<float> cos0, cos1;  // [n]
  std::vector<uint64_t> keyed, keyed_tmp;  // (sortable score bits << 32 | rank)
  std::vector<int64_t> tokens;   // [n]
};

// Maps a score to a uint32 whose unsigned order is bhc::score_less's order: -0 and +0 equal,
// every NaN last (and equal to each other).
inline uint32_t sortable_score_bits(float r) {
  if (r != r) return 0xFFFFFFFFu;
  if (r == 0.0f) r = 0.0f;  // -0 -> +0
  uint32_t b;
  std::memcpy(&b, &r, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Sorts packed (score bits << 32 | rank) keys ascending. The ranks are distinct, so this is
// exactly a stable sort by score. Small inputs: std::sort; large: LSD radix on the score bits
// (stable, so ranks stay ascending inside equal scores).
void sort_keys(std::vector<uint64_t>& keys, std::vector<uint64_t>& tmp) {
  const size_t n = keys.size();
  if (n < 512) {
    std::sort(keys.begin(), keys.end());
    return;
  }
  tmp.resize(n);
  uint64_t* src = keys.data();
  uint64_t* dst = tmp.data();
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 32 + 8 * pass;
    size_t count[257] = {0};
    for (size_t t = 0; t < n; ++t) ++count[((src[t] >> shift) & 0xFF) + 1];
    if (count[((src[0] >> shift) & 0xFF) + 1] == n) continue;  // all equal in this digit
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (size_t t = 0; t < n; ++t) dst[count[(src[t] >> shift) & 0xFF]++] = src[t];
    std::swap(src, dst);
  }
  if (src != keys.data()) std::memcpy(keys.data(), src, n * sizeof(uint64_t));
}

inline void normalise(float* c, int64_t d) {
  float sq = 0.f;
  for (int64_t i = 0; i < d; ++i) sq += c[i] * c[i];
  const float inv = 1.0f / std::max(std::sqrt(sq), bhc::kNormEps);
  for (int64_t i = 0; i < d; ++i) c[i] *= inv;
}

// cos0[t] = <xn_t, c0>, cos1[t] = <xn_t, c1> for the n tokens of a group (vectorised over t).
MMBOAT_FSLA_HOT
void group_cosines(const float* feats_t, int64_t ld, const float* c0, const float* c1, int64_t d,
                   int64_t n, float* cos0, float* cos1) {
  std::fill(cos0, cos0 + n, 0.f);
  std::fill(cos1, cos1 + n, 0.f);
  for (int64_t i = 0; i < d; ++i) {
    const float a = c0[i], b = c1[i];
    const float* row = feats_t + i * ld;
    for (int64_t t = 0; t < n; ++t) {
      cos0[t] += a * row[t];
      cos1[t] += b * row[t];
    }
  }
}

// sums_j = sum_t a_tj x_t with a = softmax(tau * cos) over the two centroids.
MMBOAT_FSLA_HOT
void soft_assign_sums(const float* feats, const float* cos0,
                      const float* cos1, int64_t d, int64_t n, float tau, float* sum0,
                      float* sum1) {
  std::fill(sum0, sum0 + d, 0.f);
  std::fill(sum1, sum1 + d, 0.f);
  const auto exp_fn = [](float z) { return std::exp(z); };
  for (int64_t t = 0; t < n; ++t) {
    const float a0 = bhc::soft_assign0(cos0[t], cos1[t], tau, exp_fn);
    const float a1 = 1.0f - a0;
    const float* x = feats + t * d;
    for (int64_t i = 0; i < d; ++i) {
      sum0[i] += a0 * x[i];
      sum1[i] += a1 * x[i];
    }
  }
}

// out[i * ld + t] = x[t * d + i] for t < n, i < d. Blocks of kBlock tokens: the reads stay in
// kBlock rows (L1) and every store writes kBlock consecutive floats, where a per-token loop
// scatters single floats ld apart (the clustering's costliest data movement).
MMBOAT_FSLA_HOT
void transpose_rows(const float* x, int64_t n, int64_t d, float* out, int64_t ld) {
  constexpr int64_t kBlock = 16;
  int64_t t0 = 0;
  for (; t0 + kBlock <= n; t0 += kBlock) {
    const float* xb = x + t0 * d;
    for (int64_t i = 0; i < d; ++i) {
      float* o = out + i * ld + t0;
      for (int64_t tt = 0; tt < kBlock; ++tt) o[tt] = xb[tt * d + i];
    }
  }
  for (int64_t t = t0; t < n; ++t)
    for (int64_t i = 0; i < d; ++i) out[i * ld + t] = x[t * d + i];
}

// Splits one group: `order[0..n)` are token ids in the group's current order and feats/feats_n
// their features ([n, d], same order); on return the first floor(n/2) are child 0 and the rest
// child 1, each in ascending score order. When out_feats is set, the features are written there
// in the new order (so the next level reads its groups contiguously instead of gathering tokens
// from all over the row; the levels alternate between two buffers).
void split_group(const float* feats, const float* feats_n, float* out_feats, float* out_feats_n,
                 int64_t d, int64_t* order, int64_t n, int64_t iters, float tau,
                 SplitScratch& s) {
  if (n < 2) {  // a single token (or none) stays where it is
    if (out_feats && n == 1) {
      std::memcpy(out_feats, feats, d * sizeof(float));
      std::memcpy(out_feats_n, feats_n, d * sizeof(float));
    }
    return;
  }
  const int64_t half = n / 2;
  s.centroids.assign(2 * d, 0.f);
  float* c0 = s.centroids.data();
  float* c1 = c0 + d;
  // Initial centroids: means of the two rank parts.
  for (int64_t t = 0; t < n; ++t) {
    const float* x = feats + t * d;
    float* c = t < half ? c0 : c1;
    for (int64_t i = 0; i < d; ++i) c[i] += x[i];
  }
  const float inv0 = 1.0f / static_cast<float>(half), inv1 = 1.0f / static_cast<float>(n - half);
  for (int64_t i = 0; i < d; ++i) {
    c0[i] *= inv0;
    c1[i] *= inv1;
  }
  normalise(c0, d);
  normalise(c1, d);
  // Row stride padded off multiples of 4 KiB (rows at such strides alias in L1 and make the
  // transposing stores thrash when n is a multiple of 1024).
  const int64_t ld = ((n + 15) & ~int64_t(15)) + 16;
  s.feats_t.resize(d * ld);
  transpose_rows(feats_n, n, d, s.feats_t.data(), ld);
  s.cos0.resize(n);
  s.cos1.resize(n);
  for (int64_t it = 0; it < iters; ++it) {
    group_cosines(s.feats_t.data(), ld, c0, c1, d, n, s.cos0.data(), s.cos1.data());
    soft_assign_sums(feats, s.cos0.data(), s.cos1.data(), d, n, tau, c0, c1);
    normalise(c0, d);
    normalise(c1, d);
  }
  group_cosines(s.feats_t.data(), ld, c0, c1, d, n, s.cos0.data(), s.cos1.data());
  s.keyed.resize(n);
  for (int64_t t = 0; t < n; ++t)
    s.keyed[t] = (uint64_t(sortable_score_bits(bhc::split_score(s.cos0[t], s.cos1[t]))) << 32) |
                 uint64_t(t);
  sort_keys(s.keyed, s.keyed_tmp);
  s.tokens.assign(order, order + n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t src = static_cast<int64_t>(s.keyed[t] & 0xFFFFFFFFu);
    order[t] = s.tokens[src];
    if (out_feats) {
      std::memcpy(out_feats + t * d, feats + src * d, d * sizeof(float));
      std::memcpy(out_feats_n + t * d, feats_n + src * d, d * sizeof(float));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bhc_cluster_cpu(const at::Tensor& x_in, int64_t cluster_size,
                                                   int64_t iters, double tau) {
  check_cluster_inputs(x_in, cluster_size, iters, tau);
  MMBOAT_CHECK_CPU(x_in);
  const at::Tensor x = x_in.detach().to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), d = x.size(3);
  const int64_t rows = batch * heads;
  // Token features L2-normalised once (the formula needs them at every level).
  at::Tensor x_n = at::empty_like(x);
  float* x_n_data = x_n.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();
  at::parallel_for(0, rows * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::copy(x_data + t * d, x_data + (t + 1) * d, x_n_data + t * d);
      normalise(x_n_data + t * d, d);
    }
  });
  // Each level reads the features in the current perm order and writes them in the new order
  // to the other buffer of a pair. Level 0 reads x itself (x may alias the caller's tensor:
  // it is never written); the normalised pair reuses x_n once level 0 has read it.
  const int levels = bhc::num_levels(n, cluster_size);
  at::Tensor raw_a = levels > 1 ? at::empty_like(x) : at::Tensor();
  at::Tensor raw_b = levels > 2 ? at::empty_like(x) : at::Tensor();
  at::Tensor nrm_b = levels > 1 ? at::empty_like(x) : at::Tensor();
  const float* feats = x_data;
  const float* feats_n = x_n_data;
  float* next = levels > 1 ? raw_a.data_ptr<float>() : nullptr;
  float* other = levels > 2 ? raw_b.data_ptr<float>() : nullptr;
  float* next_n = levels > 1 ? nrm_b.data_ptr<float>() : nullptr;
  float* other_n = x_n_data;
  at::Tensor perm = at::empty({batch, heads, n}, x.options().dtype(at::kLong));
  int64_t* order = perm.data_ptr<int64_t>();
  at::parallel_for(0, rows * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) order[t] = t % n;
  });
  const float tau_f = static_cast<float>(tau);
  for (int level = 0; level < levels; ++level) {
    const int64_t groups = int64_t(1) << level;
    const bool last = level + 1 == levels;  // its features are not read again
    at::parallel_for(0, rows * groups, 1, [&](int64_t begin, int64_t end) {
      SplitScratch scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / groups, group = task % groups;
        const Extent e = bhc::group_extent(n, level, group);
        const int64_t at = (row * n + e.offset) * d;
        split_group(feats + at, feats_n + at, last ? nullptr : next + at,
                    last ? nullptr : next_n + at, d, order + row * n + e.offset, e.size, iters,
                    tau_f, scratch);
      }
    });
    if (!last) {
      feats = next;
      feats_n = next_n;
      std::swap(next, other);
      std::swap(next_n, other_n);
    }
  }
  at::Tensor inv_perm = at::empty_like(perm);
  int64_t* inv = inv_perm.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t t = 0; t < n; ++t) inv[row * n + order[row * n + t]] = t;
    }
  });
  return {perm, inv_perm};
}

// ---------------------------------------------------------------------------------------------
// Clustered attention

// Every row of perm must be a permutation of 0..N-1 (else out-of-range reads or racing writes).
void check_permutation(const at::Tensor& perm, const char* op) {
  const int64_t n = perm.size(2), rows = perm.numel() / std::max<int64_t>(n, 1);
  const int64_t* p = perm.data_ptr<int64_t>();
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> seen(n);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t v = p[row * n + t];
        if (v < 0 || v >= n || seen[v]) {
          bad_row.store(row);
          break;
        }
        seen[v] = 1;
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, op, ": perm must be a permutation of 0..N-1 (N = ", n,
              ") in every [sample, head] row; row ", bad_row.load(), " is not");
}

template <typename T>
struct LeafBuffers {
  std::vector<int64_t> key_tokens;  // [K]
  std::vector<T> k_t, v_t;          // [d, K] (transposed: vectorise over keys)
  std::vector<T> k_r, v_r;          // [K, d] (vectorise over channels)
  std::vector<T> p, dp;             // [K]
  std::vector<T> dk, dv;            // [K, d]

  // Gathers the leaf's keys (own tokens, then the sibling overlap) from raster order.
  // The forward needs k_t and v_r, the backward all four.
  int64_t load(const int64_t* perm_row, const LeafKeys& keys, const T* k, const T* v, int64_t d,
               bool backward) {
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
inline float softmax_exp(float x) {
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
inline double softmax_exp(double x) { return std::exp(x); }

// s[j] = sum_c a[c] * m_t[c, j] for the K keys (vectorised over keys).
template <typename T>
inline void dots_with_keys(const T* a, const T* m_t, int64_t d, int64_t count, T* s) {
  std::fill(s, s + count, T(0));
  for (int64_t c = 0; c < d; ++c) {
    const T ac = a[c];
    const T* row = m_t + c * count;
    for (int64_t j = 0; j < count; ++j) s[j] += ac * row[j];
  }
}

// Sum with 8 independent partial sums (a plain loop is latency bound under strict FP).
template <typename T>
inline T blocked_sum(const T* x, int64_t n) {
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
inline T blocked_max(const T* x, int64_t n) {
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

template <typename T>
MMBOAT_FSLA_HOT void attention_forward_leaf(const T* q, const int64_t* perm_row,
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

template <typename T>
void clustered_attention_forward_impl(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const at::Tensor& perm,
                                      int64_t cluster_size, int64_t overlap, double scale,
                                      at::Tensor& out, at::Tensor& lse) {
  const int64_t rows = query.size(0) * query.size(1), n = query.size(2), d = query.size(3);
  const int levels = bhc::num_levels(n, cluster_size);
  const int64_t leaves = int64_t(1) << levels;
  const T* q = query.data_ptr<T>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const int64_t* pm = perm.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  T* l = lse.data_ptr<T>();
  at::parallel_for(0, rows * leaves, 1, [&](int64_t begin, int64_t end) {
    LeafBuffers<T> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / leaves, leaf = task % leaves;
      const LeafKeys keys = bhc::leaf_keys(n, levels, leaf, overlap);
      if (keys.own.size == 0) continue;
      const int64_t base = row * n;
      const int64_t* perm_row = pm + base;
      // Token buffers are row-relative: shift the raster pointers to this row.
      buf.load(perm_row, keys, k + base * d, v + base * d, d, false);
      attention_forward_leaf(q + base * d, perm_row, keys, d, static_cast<T>(scale), buf,
                             o + base * d, l + base);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> clustered_attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& perm, int64_t cluster_size, int64_t overlap, double scale) {
  check_attention_inputs(query, key, value, perm, cluster_size, overlap);
  MMBOAT_CHECK_CPU(query);
  check_permutation(perm, "clustered_attention_forward");
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, 3), query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "clustered_attention_forward_cpu", [&] {
    clustered_attention_forward_impl<scalar_t>(query, key, value, perm, cluster_size, overlap,
                                               scale, out, lse);
  });
  return {out, lse};
}

template <typename T>
MMBOAT_FSLA_HOT void attention_backward_leaf(const T* q, const T* grad_out, const T* out, const T* lse,
                             const int64_t* perm_row, const LeafKeys& keys, int64_t d, T scale,
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

template <typename T>
void clustered_attention_backward_impl(const at::Tensor& grad_out, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& perm, const at::Tensor& out,
                                       const at::Tensor& lse, int64_t cluster_size,
                                       int64_t overlap, double scale, at::Tensor& grad_q,
                                       at::Tensor& grad_k, at::Tensor& grad_v) {
  const int64_t rows = query.size(0) * query.size(1), n = query.size(2), d = query.size(3);
  const int levels = bhc::num_levels(n, cluster_size);
  const int64_t leaves = int64_t(1) << levels;
  // Leaves 2j and 2j+1 read each other's keys: one task per sibling pair.
  const int64_t per_task = levels > 0 ? 2 : 1;
  const int64_t tasks = leaves / per_task;
  const T* q = query.data_ptr<T>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const T* go = grad_out.data_ptr<T>();
  const T* o = out.data_ptr<T>();
  const T* l = lse.data_ptr<T>();
  const int64_t* pm = perm.data_ptr<int64_t>();
  T* gq = grad_q.data_ptr<T>();
  T* gk = grad_k.data_ptr<T>();
  T* gv = grad_v.data_ptr<T>();
  at::parallel_for(0, rows * tasks, 1, [&](int64_t begin, int64_t end) {
    LeafBuffers<T> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / tasks, pair = task % tasks;
      const int64_t base = row * n;
      const int64_t* perm_row = pm + base;
      for (int64_t leaf = pair * per_task; leaf < (pair + 1) * per_task; ++leaf) {
        const LeafKeys keys = bhc::leaf_keys(n, levels, leaf, overlap);
        if (keys.own.size == 0) continue;
        buf.load(perm_row, keys, k + base * d, v + base * d, d, true);
        attention_backward_leaf(q + base * d, go + base * d, o + base * d, l + base, perm_row,
                                keys, d, static_cast<T>(scale), buf, gq + base * d,
                                gk + base * d, gv + base * d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clustered_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& perm, const at::Tensor& out,
    const at::Tensor& logsumexp, int64_t cluster_size, int64_t overlap, double scale) {
  check_attention_backward_inputs(grad_out, query, key, value, perm, out, logsumexp,
                                  cluster_size, overlap);
  MMBOAT_CHECK_CPU(query);
  check_permutation(perm, "clustered_attention_backward");
  at::Tensor grad_q = at::zeros_like(query);
  at::Tensor grad_k = at::zeros_like(key);
  at::Tensor grad_v = at::zeros_like(value);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "clustered_attention_backward_cpu", [&] {
    clustered_attention_backward_impl<scalar_t>(grad_out, query, key, value, perm, out,
                                                logsumexp, cluster_size, overlap, scale, grad_q,
                                                grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace fsla
}  // namespace mmboat

TORCH_LIBRARY_IMPL(mmboat, CPU, m) {
  m.impl("bhc_cluster", &mmboat::fsla::bhc_cluster_cpu);
  m.impl("clustered_attention_forward", &mmboat::fsla::clustered_attention_forward_cpu);
  m.impl("clustered_attention_backward", &mmboat::fsla::clustered_attention_backward_cpu);
}
