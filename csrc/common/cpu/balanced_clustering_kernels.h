// Balanced hierarchical clustering (BOAT FSLA), CPU kernels (torch-free: raw pointers, sizes and a
// thread pool passed in). The torch launcher, argument checks and op registration live in
// csrc/pytorch/cpu/feature_space_attention_cpu.cpp; the layout rule and per-token formulas in
// ../balanced_clustering.h (shared with the CUDA kernels).
//
// Every (sample * head, level, group) split is a task once its parent's is done (no barrier
// between levels; see bhc_cluster). A split: initial centroids (means of the two rank halves),
// `iters` soft k-means steps on the normalised features, split scores, a stable sort by score.
// float with head_dim 8, 16, ..., 64 runs AVX2+FMA kernels chosen at run time (templates on
// head_dim / 8, rows in registers, dot products of 8 tokens reduced together, the polynomial exp
// of avx2_math.h); every other head_dim runs the generic split (its AVX2 instance is the same
// code vectorised by the compiler, same bits). Both follow the same formulas; their float32
// roundings differ, which can only reorder tokens whose split scores tie to ~1e-7.
//
// Threads: `par` as in neighborhood_attention_kernels.h (par.for_range, par.num_threads).
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include "balanced_clustering.h"
#include "cpu/avx2_math.h"

namespace mmboat {
namespace cpu {
namespace fsla {

using ::mmboat::bhc::Extent;

struct SplitScratch {
  std::vector<float> centroids;  // [2, d]
  std::vector<float> feats_t;    // [d, n]: normalised features of the group, transposed
  std::vector<float> cos0, cos1;  // [n]
  std::vector<uint64_t> keyed, keyed_tmp;  // (sortable score bits << 32 | rank)
  std::vector<uint32_t> buckets;           // sort_keys' bucket counts
  uint32_t score_lo = 0, score_hi = 0;     // smallest and largest score bits in keyed
  std::vector<int64_t> tokens;   // [n]
  std::vector<float> tail;       // [8, d] rows + [8] inverse norms: the zero-padded last
                                 // partial block (AVX2 path)
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

// Sorts packed (score bits << 32 | rank) keys ascending. The keys are distinct (the ranks are),
// so this is exactly a stable sort by score. One bucket pass on the leading bits of the score
// range (about two buckets per key, at most 4096 so the counts stay in L1; scores spread
// smoothly) leaves every key in its bucket, and an insertion sort finishes the few moves inside
// buckets. A bucket that comes out large (a skewed range: inf or NaN scores) gets std::sort,
// so the worst case stays n log n. On clustering scores this takes about 0.6x the time of a
// 4-pass LSD radix sort (98 to 3136 keys). lo and hi: the smallest and largest score bits.
inline void sort_keys(std::vector<uint64_t>& keys, std::vector<uint64_t>& tmp,
               std::vector<uint32_t>& count, uint32_t lo, uint32_t hi) {
  constexpr size_t kInsertionMax = 48;
  const size_t n = keys.size();
  // Insertion sort whose first step is a branch-free compare-exchange: most keys that move at
  // all move by one place (buckets hold one or two keys), and that branch mispredicts half the
  // time.
  const auto insertion_sort = [](uint64_t* k, size_t m) {
    for (size_t i = 1; i < m; ++i) {
      const uint64_t v = k[i], p = k[i - 1];
      const bool swap = p > v;
      k[i - 1] = swap ? v : p;
      k[i] = swap ? p : v;
      if (swap && i >= 2 && k[i - 2] > v) {
        size_t j = i - 1;
        for (; j > 0 && k[j - 1] > v; --j) k[j] = k[j - 1];
        k[j] = v;
      }
    }
  };
  if (n <= kInsertionMax) {
    insertion_sort(keys.data(), n);
    return;
  }
  if (lo == hi) return;  // one score: already in rank order
  int bucket_bits = 4;
  while (bucket_bits < 12 && (size_t(1) << bucket_bits) < 2 * n) ++bucket_bits;
  const int range_bits = 32 - __builtin_clz(hi - lo);
  const int shift = std::max(0, range_bits - bucket_bits);
  const size_t buckets = ((hi - lo) >> shift) + 1;
  const auto bucket = [&](uint64_t key) {
    return (static_cast<uint32_t>(key >> 32) - lo) >> shift;
  };
  count.assign(buckets + 1, 0);
  for (size_t t = 0; t < n; ++t) ++count[bucket(keys[t]) + 1];
  uint32_t largest = 0;
  for (size_t b = 1; b <= buckets; ++b) {  // count[b]: start of bucket b
    largest = std::max(largest, count[b]);
    count[b] += count[b - 1];
  }
  tmp.resize(n);
  for (size_t t = 0; t < n; ++t) tmp[count[bucket(keys[t])]++] = keys[t];
  keys.swap(tmp);
  // Now count[b] is the end of bucket b. With shift 0 every bucket holds one score, its keys
  // already in rank order.
  if (shift == 0) return;
  if (largest <= kInsertionMax) {  // keys only move inside their buckets
    insertion_sort(keys.data(), n);
    return;
  }
  size_t begin = 0;
  for (size_t b = 0; b < buckets; ++b) {
    const size_t end = count[b];
    if (end - begin > kInsertionMax)
      std::sort(keys.begin() + begin, keys.begin() + end);
    else
      insertion_sort(keys.data() + begin, end - begin);
    begin = end;
  }
}

// 1 / max(|c|, eps): F.normalize's factor.
inline float inverse_norm(const float* c, int64_t d) {
  float sq = 0.f;
  for (int64_t i = 0; i < d; ++i) sq += c[i] * c[i];
  return 1.0f / std::max(std::sqrt(sq), bhc::kNormEps);
}

inline void normalise(float* c, int64_t d) {
  const float inv = inverse_norm(c, d);
  for (int64_t i = 0; i < d; ++i) c[i] *= inv;
}

// cos0[t] = <xn_t, c0>, cos1[t] = <xn_t, c1> for the n tokens of a group (vectorised over t).
MMBOAT_INLINE void group_cosines(const float* feats_t, int64_t ld, const float* c0, const float* c1, int64_t d,
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
MMBOAT_INLINE void soft_assign_sums(const float* feats, int64_t xs, const float* cos0,
                                    const float* cos1, int64_t d, int64_t n, float tau,
                                    float* sum0, float* sum1) {
  std::fill(sum0, sum0 + d, 0.f);
  std::fill(sum1, sum1 + d, 0.f);
  const auto exp_fn = [](float z) { return std::exp(z); };
  for (int64_t t = 0; t < n; ++t) {
    const float a0 = bhc::soft_assign0(cos0[t], cos1[t], tau, exp_fn);
    const float a1 = 1.0f - a0;
    const float* x = feats + t * xs;
    for (int64_t i = 0; i < d; ++i) {
      sum0[i] += a0 * x[i];
      sum1[i] += a1 * x[i];
    }
  }
}

// out[i * ld + t] = x[t * xs + i] * inv[t] (the normalised features, transposed) for t < n,
// i < d. Blocks of kBlock tokens: the reads stay in kBlock rows (L1) and every store writes
// kBlock consecutive floats, where a per-token loop scatters single floats ld apart.
MMBOAT_INLINE void transpose_rows(const float* x, int64_t xs, const float* inv, int64_t n,
                                  int64_t d, float* out, int64_t ld) {
  constexpr int64_t kBlock = 16;
  int64_t t0 = 0;
  for (; t0 + kBlock <= n; t0 += kBlock) {
    const float* xb = x + t0 * xs;
    const float* ib = inv + t0;
    for (int64_t i = 0; i < d; ++i) {
      float* o = out + i * ld + t0;
      for (int64_t tt = 0; tt < kBlock; ++tt) o[tt] = xb[tt * xs + i] * ib[tt];
    }
  }
  for (int64_t t = t0; t < n; ++t)
    for (int64_t i = 0; i < d; ++i) out[i * ld + t] = x[t * xs + i] * inv[t];
}

// Stable sort of the group by score (s.keyed holds score bits << 32 | rank); order[] takes the
// new token order and move(t, src) is called for every new position t with its old rank src.
template <typename Move>
inline void sort_and_reorder(SplitScratch& s, int64_t* order, int64_t n, Move move) {
  sort_keys(s.keyed, s.keyed_tmp, s.buckets, s.score_lo, s.score_hi);
  s.tokens.assign(order, order + n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t src = static_cast<int64_t>(s.keyed[t] & 0xFFFFFFFFu);
    order[t] = s.tokens[src];
    move(t, src);
  }
}

// One group's data for split_group. In: the raw features of its n tokens in their current
// order (rows xs apart) and their inverse L2 norms; optionally `init`, the sums of the two rank
// halves ([2, d], the initial centroids before scaling; the parent's reorder adds them up in
// passing). Out, each optional (the last level reads nothing back): the features and norms in
// the new order (d apart) and `out_init`, the rank-half sums of each child ([2, d] each; null
// for a child that will not split).
struct GroupIO {
  const float* feats;
  int64_t xs;
  const float* inv;
  const float* init;
  float* out_feats;
  float* out_inv;
  float* out_init[2];
};

// Ends of the four rank quarters of a split group: the two halves of each child.
inline void child_halves(int64_t n, int64_t (&bounds)[5]) {
  const int64_t half = n / 2;
  bounds[0] = 0;
  bounds[1] = half / 2;
  bounds[2] = half;
  bounds[3] = half + (n - half) / 2;
  bounds[4] = n;
}

// The generic split of one group with n >= 2 tokens (see split_group). Its three hot loops run
// in the instance (baseline or AVX2) this CPU takes.
inline void split_group_generic(const GroupIO& io, int64_t d, int64_t* order, int64_t n,
                                       int64_t iters, float tau, SplitScratch& s) {
  const float* feats = io.feats;
  const int64_t xs = io.xs;
  const int64_t half = n / 2;
  s.centroids.assign(2 * d, 0.f);
  float* c0 = s.centroids.data();
  float* c1 = c0 + d;
  // Initial centroids: means of the two rank parts.
  if (io.init) {
    std::copy(io.init, io.init + 2 * d, c0);
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const float* x = feats + t * xs;
      float* c = t < half ? c0 : c1;
      for (int64_t i = 0; i < d; ++i) c[i] += x[i];
    }
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
  static const auto transpose = simd::generic_instance<&transpose_rows>();
  static const auto cosines = simd::generic_instance<&group_cosines>();
  static const auto sums = simd::generic_instance<&soft_assign_sums>();
  transpose(feats, xs, io.inv, n, d, s.feats_t.data(), ld);
  s.cos0.resize(n);
  s.cos1.resize(n);
  for (int64_t it = 0; it < iters; ++it) {
    cosines(s.feats_t.data(), ld, c0, c1, d, n, s.cos0.data(), s.cos1.data());
    sums(feats, xs, s.cos0.data(), s.cos1.data(), d, n, tau, c0, c1);
    normalise(c0, d);
    normalise(c1, d);
  }
  cosines(s.feats_t.data(), ld, c0, c1, d, n, s.cos0.data(), s.cos1.data());
  s.keyed.resize(n);
  s.score_lo = 0xFFFFFFFFu;
  s.score_hi = 0;
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t bits = sortable_score_bits(bhc::split_score(s.cos0[t], s.cos1[t]));
    s.keyed[t] = (uint64_t(bits) << 32) | uint64_t(t);
    s.score_lo = std::min(s.score_lo, bits);
    s.score_hi = std::max(s.score_hi, bits);
  }
  int64_t bounds[5];
  child_halves(n, bounds);
  for (float* sums : io.out_init)
    if (sums) std::fill(sums, sums + 2 * d, 0.f);
  sort_and_reorder(s, order, n, [&](int64_t t, int64_t src) {
    if (!io.out_feats) return;
    float* out = io.out_feats + t * d;
    std::memcpy(out, feats + src * xs, d * sizeof(float));
    io.out_inv[t] = io.inv[src];
    // In t order, as the initial-centroid loop above adds them.
    const int q = (t >= bounds[1]) + (t >= bounds[2]) + (t >= bounds[3]);
    if (float* sums = io.out_init[q / 2]) {
      float* sum = sums + d * (q % 2);
      for (int64_t i = 0; i < d; ++i) sum[i] += out[i];
    }
  });
}

#if MMBOAT_X86
// ---------------------------------------------------------------------------------------------
// AVX2 split of one group (float, d = 8 * NC, NC <= 8), same steps as split_group: the features
// stay token-major (no transpose); dot products of 8 tokens are reduced together and scaled by
// the tokens' inverse norms. The soft assignment needs only tau * (cos0 - cos1), one product per
// token with c0 - c1, and runs on 8 tokens at once with a polynomial exp; the centroid sums stay
// in registers (the second is the group's total minus the first). The final split scores (both
// cosines) become sort keys on 8 lanes. A partial last block runs on a zero-padded copy.

// Cosines of 8 consecutive tokens (rows at rows, xs apart; inverse norms inv) with both (unit)
// centroids: s0 / s1 lane j = token j.
template <int NC>
MMBOAT_AVX2 inline void cosines8(const float* rows, int64_t xs, const float* inv,
                                 const __m256* c0, const __m256* c1, __m256& s0, __m256& s1) {
  __m256 half[2];
  for (int h = 0; h < 2; ++h) {
    const float* x = rows + 4 * h * xs;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int c = 0; c < NC; ++c) {
      __m256 v = _mm256_loadu_ps(x + 8 * c);
      a0 = _mm256_fmadd_ps(v, c0[c], a0);
      b0 = _mm256_fmadd_ps(v, c1[c], b0);
      v = _mm256_loadu_ps(x + xs + 8 * c);
      a1 = _mm256_fmadd_ps(v, c0[c], a1);
      b1 = _mm256_fmadd_ps(v, c1[c], b1);
      v = _mm256_loadu_ps(x + 2 * xs + 8 * c);
      a2 = _mm256_fmadd_ps(v, c0[c], a2);
      b2 = _mm256_fmadd_ps(v, c1[c], b2);
      v = _mm256_loadu_ps(x + 3 * xs + 8 * c);
      a3 = _mm256_fmadd_ps(v, c0[c], a3);
      b3 = _mm256_fmadd_ps(v, c1[c], b3);
    }
    half[h] = simd::hsum8(a0, a1, a2, a3, b0, b1, b2, b3);  // [cos0 of 4 | cos1 of 4]
  }
  const __m256 inv8 = _mm256_loadu_ps(inv);
  s0 = _mm256_mul_ps(_mm256_permute2f128_ps(half[0], half[1], 0x20), inv8);
  s1 = _mm256_mul_ps(_mm256_permute2f128_ps(half[0], half[1], 0x31), inv8);
}

// c <- normalise(c * scale), through memory (the scalar normalise keeps one rounding rule).
template <int NC>
MMBOAT_AVX2 inline void finish_centroid(__m256* c, float scale, float* tmp) {
  for (int k = 0; k < NC; ++k) _mm256_storeu_ps(tmp + 8 * k, c[k]);
  for (int64_t i = 0; i < 8 * NC; ++i) tmp[i] *= scale;
  normalise(tmp, 8 * NC);
  for (int k = 0; k < NC; ++k) c[k] = _mm256_loadu_ps(tmp + 8 * k);
}

// Weight of centroid 0 for 8 tokens from dz = tau * (cos0 - cos1): bhc::soft_assign0 with the
// larger logit taken out, e / (1 + e) or 1 / (1 + e) for e = exp(-|dz|). NaN stays NaN.
MMBOAT_AVX2 inline __m256 soft_assign0_diff8(__m256 dz) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = simd::exp8(_mm256_or_ps(dz, _mm256_set1_ps(-0.0f)));  // exp(-|dz|)
  const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(dz, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_div_ps(num, _mm256_add_ps(one, e));
}

// tau * (cos0 - cos1) of 8 consecutive tokens (rows xs apart, inverse norms inv) from their dot
// products with c0 - c1: one product per token where the soft assignment needs no more.
template <int NC>
MMBOAT_AVX2 inline __m256 cosine_gap8(const float* rows, int64_t xs, const float* inv,
                                      const __m256* cd, __m256 tau) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_mul_ps(_mm256_loadu_ps(rows + j * xs), cd[0]);
  for (int c = 1; c < NC; ++c)
    for (int j = 0; j < 8; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + j * xs + 8 * c), cd[c], acc[j]);
  const __m256 dots = simd::hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
  return _mm256_mul_ps(tau, _mm256_mul_ps(dots, _mm256_loadu_ps(inv)));
}

// Running sums of rows of d = 8 * NC features: a sum is a chain of dependent adds per
// register, so rows go round-robin to kRowSets<NC> sets of NC registers (~8 chains in flight).
template <int NC>
constexpr int kRowSets = NC >= 8 ? 1 : (NC >= 4 ? 2 : (NC >= 2 ? 4 : 8));

template <int NC>
MMBOAT_AVX2 inline void zero_sets(__m256 (&acc)[kRowSets<NC>][NC]) {
  for (int set = 0; set < kRowSets<NC>; ++set)
    for (int k = 0; k < NC; ++k) acc[set][k] = _mm256_setzero_ps();
}

template <int NC>
MMBOAT_AVX2 inline void reduce_sets(const __m256 (&acc)[kRowSets<NC>][NC], __m256* out) {
  for (int k = 0; k < NC; ++k) {
    __m256 r = acc[0][k];
    for (int set = 1; set < kRowSets<NC>; ++set) r = _mm256_add_ps(r, acc[set][k]);
    out[k] = r;
  }
}

// out = sum of rows [begin, end) (xs apart).
template <int NC>
MMBOAT_AVX2 inline void sum_rows(const float* x, int64_t xs, int64_t begin, int64_t end,
                                 __m256* out) {
  constexpr int S = kRowSets<NC>;
  __m256 acc[S][NC];
  zero_sets<NC>(acc);
  int64_t t = begin;
  for (; t + S <= end; t += S)
    for (int set = 0; set < S; ++set)
      for (int k = 0; k < NC; ++k)
        acc[set][k] = _mm256_add_ps(acc[set][k], _mm256_loadu_ps(x + (t + set) * xs + 8 * k));
  for (; t < end; ++t)
    for (int k = 0; k < NC; ++k)
      acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_loadu_ps(x + t * xs + 8 * k));
  reduce_sets<NC>(acc, out);
}

// kDense: rows d apart (every level but the first, and a contiguous first level), a stride the
// compiler folds into the addresses.
template <int NC, bool kDense>
MMBOAT_AVX2 void split_group_avx2_impl(const GroupIO& io, int64_t* order, int64_t n,
                                       int64_t iters, float tau, SplitScratch& s) {
  constexpr int64_t d = 8 * NC;
  const float* feats = io.feats;
  const int64_t xs = kDense ? d : io.xs;
  const int64_t half = n / 2;
  const int64_t full = n & ~int64_t(7);
  // Block at t: its rows, their stride and inverse norms. The partial last block reads a
  // zero-padded copy with rows d apart (xs may be smaller than d, even 0, for views whose
  // tokens overlap).
  s.tail.assign(8 * d + 8, 0.f);
  for (int64_t t = full; t < n; ++t)
    std::memcpy(s.tail.data() + (t - full) * d, feats + t * xs, d * sizeof(float));
  std::memcpy(s.tail.data() + 8 * d, io.inv + full, (n - full) * sizeof(float));
  const auto rows = [&](int64_t t) { return t < full ? feats + t * xs : s.tail.data(); };
  const auto stride = [&](int64_t t) { return kDense || t >= full ? d : xs; };
  const auto invs = [&](int64_t t) { return t < full ? io.inv + t : s.tail.data() + 8 * d; };

  // Initial centroids: means of the two rank parts; their sum is the group's total.
  __m256 c0[NC], c1[NC], total[NC];
  if (io.init) {
    for (int k = 0; k < NC; ++k) {
      c0[k] = _mm256_loadu_ps(io.init + 8 * k);
      c1[k] = _mm256_loadu_ps(io.init + d + 8 * k);
    }
  } else {
    sum_rows<NC>(feats, xs, 0, half, c0);
    sum_rows<NC>(feats, xs, half, n, c1);
  }
  for (int k = 0; k < NC; ++k) total[k] = _mm256_add_ps(c0[k], c1[k]);
  s.centroids.resize(d);
  finish_centroid<NC>(c0, 1.0f / static_cast<float>(half), s.centroids.data());
  finish_centroid<NC>(c1, 1.0f / static_cast<float>(n - half), s.centroids.data());

  // Each iteration runs in chunks of kChunk tokens: first the weights of the whole chunk (the
  // long exp/divide chains of its blocks overlap), then the weighted sum of its rows (in L1).
  constexpr int64_t kChunk = 64;
  constexpr int S = kRowSets<NC>;
  const __m256 tau_v = _mm256_set1_ps(tau), one = _mm256_set1_ps(1.0f);
  alignas(32) float w0[kChunk];
  for (int64_t it = 0; it < iters; ++it) {
    __m256 cd[NC], acc[S][NC];
    for (int k = 0; k < NC; ++k) cd[k] = _mm256_sub_ps(c0[k], c1[k]);
    zero_sets<NC>(acc);
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t t1 = std::min(n, t0 + kChunk);
      for (int64_t t = t0; t < t1; t += 8) {
        const __m256 dz = cosine_gap8<NC>(rows(t), stride(t), invs(t), cd, tau_v);
        _mm256_store_ps(w0 + (t - t0), soft_assign0_diff8(dz));
      }
      for (int64_t t = t1; t < ((t1 + 7) & ~int64_t(7)); ++t) w0[t - t0] = 0.f;  // padding rows
      for (int64_t t = t0; t < t1; t += 8) {
        const float* x = rows(t);
        const int64_t bs = stride(t);
        for (int j = 0; j < 8; ++j) {
          const __m256 w = _mm256_broadcast_ss(w0 + (t - t0) + j);
          for (int k = 0; k < NC; ++k)
            acc[j % S][k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j * bs + 8 * k), acc[j % S][k]);
        }
      }
    }
    // sum_t (1 - a0_t) x_t = total - sum_t a0_t x_t
    reduce_sets<NC>(acc, c0);
    for (int k = 0; k < NC; ++k) c1[k] = _mm256_sub_ps(total[k], c0[k]);
    finish_centroid<NC>(c0, 1.0f, s.centroids.data());
    finish_centroid<NC>(c1, 1.0f, s.centroids.data());
  }

  // Split scores, straight into sort keys (sortable_score_bits on 8 lanes, next to the ranks)
  // and their range.
  s.keyed.resize(full + 8);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  __m256i lo8 = _mm256_set1_epi32(-1), hi8 = _mm256_setzero_si256();
  for (int64_t t = 0; t < n; t += 8) {
    __m256 s0, s1;
    cosines8<NC>(rows(t), stride(t), invs(t), c0, c1, s0, s1);
    // + 0 turns -0 into +0; NaN becomes all ones.
    const __m256 r = _mm256_add_ps(
        _mm256_div_ps(_mm256_add_ps(one, s0), _mm256_add_ps(one, s1)), _mm256_setzero_ps());
    const __m256i b = _mm256_castps_si256(r);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q));
    const __m256i key =
        _mm256_or_si256(_mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign)), nan);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - t)), lane);
    const __m256i invalid = _mm256_xor_si256(valid, _mm256_set1_epi32(-1));
    lo8 = _mm256_min_epu32(lo8, _mm256_or_si256(key, invalid));
    hi8 = _mm256_max_epu32(hi8, _mm256_and_si256(key, valid));
    const __m256i rank = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(t)), lane);
    const __m256i k01 = _mm256_unpacklo_epi32(rank, key);  // keys 0 1 | 4 5
    const __m256i k23 = _mm256_unpackhi_epi32(rank, key);  // keys 2 3 | 6 7
    uint64_t* out = s.keyed.data() + t;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(k01, k23, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4),
                        _mm256_permute2x128_si256(k01, k23, 0x31));
  }
  s.keyed.resize(n);
  alignas(32) uint32_t lo_lanes[8], hi_lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo_lanes), lo8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi_lanes), hi8);
  s.score_lo = *std::min_element(lo_lanes, lo_lanes + 8);
  s.score_hi = *std::max_element(hi_lanes, hi_lanes + 8);
  sort_and_reorder(s, order, n, [](int64_t, int64_t) {});
  if (!io.out_feats) return;
  // The features gathered into the new order: a gather from all over the group (L2 or beyond
  // for large groups), so prefetch ahead. The rank-half sums of the children (the next level's
  // initial centroids) are added up on the way.
  constexpr int64_t kAhead = 8;
  const uint64_t* keyed = s.keyed.data();
  const float* inv = io.inv;
  float* const out_feats = io.out_feats;
  float* const out_inv = io.out_inv;
  const auto copy_row = [&](int64_t t, __m256* sum) MMBOAT_AVX2 {
    const int64_t src = static_cast<int64_t>(keyed[t] & 0xFFFFFFFFu);
    if (t + kAhead < n) {
      const char* ahead = reinterpret_cast<const char*>(
          feats + static_cast<int64_t>(keyed[t + kAhead] & 0xFFFFFFFFu) * xs);
      for (int64_t line = 0; line < d * 4; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    for (int k = 0; k < NC; ++k) {
      const __m256 v = _mm256_loadu_ps(feats + src * xs + 8 * k);
      _mm256_storeu_ps(out_feats + t * d + 8 * k, v);
      sum[k] = _mm256_add_ps(sum[k], v);
    }
    out_inv[t] = inv[src];
  };
  int64_t bounds[5];
  child_halves(n, bounds);
  for (int q = 0; q < 4; ++q) {
    __m256 acc[S][NC];
    zero_sets<NC>(acc);
    int64_t t = bounds[q];
    for (; t + S <= bounds[q + 1]; t += S)
      for (int set = 0; set < S; ++set) copy_row(t + set, acc[set]);
    for (; t < bounds[q + 1]; ++t) copy_row(t, acc[0]);
    if (float* sums = io.out_init[q / 2]) {
      __m256 r[NC];
      reduce_sets<NC>(acc, r);
      for (int k = 0; k < NC; ++k) _mm256_storeu_ps(sums + (q % 2) * d + 8 * k, r[k]);
    }
  }
}

template <int NC>
void split_group_dense(const GroupIO& io, int64_t* order, int64_t n, int64_t iters, float tau,
                       SplitScratch& s) {
  split_group_avx2_impl<NC, true>(io, order, n, iters, tau, s);
}

template <int NC>
void split_group_strided(const GroupIO& io, int64_t* order, int64_t n, int64_t iters, float tau,
                         SplitScratch& s) {
  split_group_avx2_impl<NC, false>(io, order, n, iters, tau, s);
}

// inv[t] = 1 / max(|x_t|, eps) for `rows` rows of d features, xs apart (d % 8 == 0).
MMBOAT_AVX2 inline void inverse_norms_avx2(const float* x, int64_t xs, float* inv, int64_t rows,
                                    int64_t d) {
  for (int64_t t = 0; t < rows; ++t) {
    __m256 sq = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + t * xs + i);
      sq = _mm256_fmadd_ps(v, v, sq);
    }
    inv[t] = 1.0f / std::max(std::sqrt(simd::hsum1(sq)), bhc::kNormEps);
  }
}

// Runs the AVX2 split when it applies (returns false otherwise).
inline bool split_group_avx2(const GroupIO& io, int64_t d, int64_t* order, int64_t n,
                             int64_t iters, float tau, SplitScratch& s) {
  using Split = void (*)(const GroupIO&, int64_t*, int64_t, int64_t, float, SplitScratch&);
  static const Split dense[8] = MMBOAT_NC_TABLE(split_group_dense);
  static const Split strided[8] = MMBOAT_NC_TABLE(split_group_strided);
  const Split split = simd::pick_avx2(d, io.xs == d ? dense : strided);
  if (split) split(io, order, n, iters, tau, s);
  return split != nullptr;
}
#endif

// Scratch floats of a clustering call. Fresh multi-MB buffers cost their page faults on every
// call (~10% of the op at 56x56), so the calling thread keeps its buffer for the next call, up
// to kKeepFloats; a larger request gets a buffer of its own, freed with the call.
class ClusteringWorkspace {
 public:
  explicit ClusteringWorkspace(int64_t floats) {
    if (floats > kKeepFloats) {
      own_.reset(new float[floats]);
      data_ = own_.get();
      return;
    }
    thread_local std::vector<float> kept;
    if (static_cast<int64_t>(kept.size()) < floats) kept = std::vector<float>(floats);
    data_ = kept.data();
  }
  float* data() const { return data_; }

 private:
  static constexpr int64_t kKeepFloats = int64_t(16) << 20;  // 64 MiB
  float* data_ = nullptr;
  std::unique_ptr<float[]> own_;
};

// inv[t] = 1 / max(|x_t|, eps) for `rows` rows of d features, xs apart.
inline void inverse_norms(const float* x, int64_t xs, float* inv, int64_t rows, int64_t d) {
#if MMBOAT_X86
  if (d % 8 == 0 && simd::cpu_has_avx2()) return inverse_norms_avx2(x, xs, inv, rows, d);
#endif
  for (int64_t t = 0; t < rows; ++t) inv[t] = inverse_norm(x + t * xs, d);
}

// Splits one group: `order[0..n)` are token ids in the group's current order (io holds their
// data, see GroupIO); on return the first floor(n/2) are child 0 and the rest child 1, each in
// ascending score order. Writing the features in the new order lets the next level read its
// groups contiguously instead of gathering tokens from all over the row (the levels alternate
// between two buffers).
inline void split_group(const GroupIO& io, int64_t d, int64_t* order, int64_t n, int64_t iters,
                        float tau, SplitScratch& s) {
  if (n < 2) {  // a single token (or none) stays where it is; its children do not split
    if (io.out_feats && n == 1) {
      std::memcpy(io.out_feats, io.feats, d * sizeof(float));
      io.out_inv[0] = io.inv[0];
    }
    return;
  }
#if MMBOAT_X86
  if (split_group_avx2(io, d, order, n, iters, tau, s)) return;
#endif
  split_group_generic(io, d, order, n, iters, tau, s);
}

// Clusters `rows` = batch * heads rows of n tokens with d float features: token t of row r is
// at x + (r / heads) * stride_batch + (r % heads) * stride_head + t * stride_token, features
// contiguous (x is only read). Writes perm (the leaf layout: token ids, leaves contiguous) and
// inv_perm (each token's position in perm), both [rows, n].
template <class Parallel>
void bhc_cluster(const Parallel& par, const float* x, int64_t batch, int64_t heads, int64_t n,
                 int64_t d, int64_t stride_batch, int64_t stride_head, int64_t stride_token,
                 int64_t cluster_size, int64_t iters, float tau, int64_t* perm,
                 int64_t* inv_perm) {
  const int64_t rows = batch * heads;
  const int64_t xs = stride_token;
  const auto x_row = [&](int64_t row) {
    return x + (row / heads) * stride_batch + (row % heads) * stride_head;
  };
  // Buffers: inverse L2 norms (two of rows * n: every level needs the normalised features) and
  // two copies of the features ([rows * n, d]). Level l reads the features and norms of a group
  // in the current perm order from pair (l + 1) % 2 (level 0: x itself and x's norms) and
  // writes them in the new order, at the same token offsets, to pair l % 2. The initial
  // centroid sums of a group of level l >= 1 ([2, d]) sit at its first token's row of buffer
  // init[(l + 1) % 2] ([rows * n, d]; a group that splits has >= 2 tokens, so its slot holds
  // them); its parent's reorder adds them up.
  const int levels = bhc::num_levels(n, cluster_size);
  const int64_t numel = rows * n * d;
  const int64_t pair0 = levels > 1 ? numel : 0, pair1 = levels > 2 ? numel : 0;
  const ClusteringWorkspace work(2 * rows * n + 2 * (pair0 + pair1));
  float* const inv_buf[2] = {work.data() + rows * n, work.data()};  // [1] starts with x's
  float* const raw_buf[2] = {work.data() + 2 * rows * n, work.data() + 2 * rows * n + pair0};
  float* const init_buf[2] = {raw_buf[1] + pair1, raw_buf[1] + pair1 + pair0};
  par.for_range(0, rows * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end;) {  // runs of tokens inside one row
      const int64_t row = t / n, i = t % n, count = std::min(end - t, n - i);
      inverse_norms(x_row(row) + i * xs, xs, inv_buf[1] + t, count, d);
      t += count;
    }
  });
  int64_t* order = perm;
  par.for_range(0, rows * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) order[t] = t % n;
  });

  // Every (level, group) split is a task that needs only its parent's, so there is no barrier
  // between levels: a worker goes on with the first child of the group it has just split (its
  // features are still in cache) and leaves the second on a shared stack. A free worker takes
  // the next row's level 0 first (the largest tasks, so rows spread over the threads even when
  // there are fewer rows than threads), then the newest stacked group.
  struct Task {
    int64_t row;
    int level;
    int64_t group;
  };
  const auto split_task = [&](const Task& task, SplitScratch& scratch) {
    const int level = task.level;
    const int read = (level + 1) % 2, write = level % 2;  // buffer pairs
    const bool last = level + 1 == levels;  // its features are not read again
    const Extent e = bhc::group_extent(n, level, task.group);
    const int64_t at = task.row * n + e.offset;
    GroupIO io;
    io.feats = level == 0 ? x_row(task.row) + e.offset * xs : raw_buf[read] + at * d;
    io.xs = level == 0 ? xs : d;
    io.inv = inv_buf[read] + at;
    io.init = level == 0 ? nullptr : init_buf[read] + at * d;
    io.out_feats = last ? nullptr : raw_buf[write] + at * d;
    io.out_inv = last ? nullptr : inv_buf[write] + at;
    const int64_t half = e.size / 2;  // children: [at, at + half), [at + half, at + size)
    io.out_init[0] = last || half < 2 ? nullptr : init_buf[write] + at * d;
    io.out_init[1] = last || e.size - half < 2 ? nullptr : init_buf[write] + (at + half) * d;
    split_group(io, d, order + at, e.size, iters, tau, scratch);
  };
  if (levels > 0) {
    std::mutex mu;  // guards stacked, next_row, unfinished and error
    std::condition_variable wake;  // a task was stacked, or the work ended
    std::vector<Task> stacked;
    int64_t next_row = 0;
    int64_t unfinished = rows * ((int64_t(1) << levels) - 1);
    std::exception_ptr error;
    const int64_t workers = std::min<int64_t>(par.num_threads(), unfinished);
    par.for_range(0, workers, 1, [&](int64_t, int64_t) {
      SplitScratch scratch;
      bool have = false;
      Task task{};
      while (true) {
        if (!have) {
          std::unique_lock<std::mutex> lock(mu);
          if (error || (unfinished == 0)) break;
          if (next_row < rows) {
            task = Task{next_row++, 0, 0};
          } else if (!stacked.empty()) {
            task = stacked.back();
            stacked.pop_back();
          } else {  // the rest is running elsewhere and may stack children
            wake.wait(lock);
            continue;
          }
        }
        try {
          split_task(task, scratch);
        } catch (...) {
          const std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
          wake.notify_all();
          break;
        }
        const std::lock_guard<std::mutex> lock(mu);
        have = task.level + 1 < levels;
        if (have) {
          stacked.push_back(Task{task.row, task.level + 1, 2 * task.group + 1});
          task = Task{task.row, task.level + 1, 2 * task.group};
          wake.notify_one();
        }
        if (--unfinished == 0) wake.notify_all();
      }
    });
    if (error) std::rethrow_exception(error);
  }
  par.for_range(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t t = 0; t < n; ++t) inv_perm[row * n + order[row * n + t]] = t;
    }
  });
}

}  // namespace fsla
}  // namespace cpu
}  // namespace mmboat
