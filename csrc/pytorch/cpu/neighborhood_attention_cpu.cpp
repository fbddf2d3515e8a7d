// CPU kernels of the neighborhood-attention ops (schemas: ../neighborhood_attention.cpp).
//
// Every problem is seen as 3-D (1-D and 2-D inputs get leading axes of size 1). One query at a
// time: the keys of its window are listed once as offsets, then logits (dot products over
// head_dim), softmax and the weighted sum run over that list. float32 with head_dim % 8 == 0
// uses AVX2+FMA kernels chosen at run time (8 slots' dot products reduced together, the
// weighted sum in registers, a polynomial exp); everything else runs generic loops with
// float32 (float64 for float64) accumulation.
//
// Backward (flash style): p is recomputed from the saved log-sum-exp. Race freedom and
// determinism come from the task layout: tasks are blocks of 2k-2 rows of one dilation group
// along the outermost non-trivial axis, and blocks of even then odd index run in two phases,
// so two tasks that run together never touch the same key. The rpb gradient is accumulated
// per task and summed in task order. A task walks its query rows in pieces (kPieceRows rows,
// strips of 64 columns on wide maps to stay in L2) and does each piece in two passes: query
// by query (logits and dO . V in one sweep over the window, p, ds, dQ), then key by key (dK
// and dV of every key the piece reaches, summed over the contiguous run of each query row's
// queries whose windows hold it, so each key's gradient rows are read and written once per
// piece; the AVX2 path takes keys in pairs so that a query row loaded once feeds both).
// When the last axis is not causal, every query of a row shares one slot list and a table of
// its rpb values (FixedRow), so the per-query work is only the dot products and sums.
// dK and dV are not zero-filled first: a per-key flag says whether its rows were written yet,
// and the first write stores instead of adding.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "neighborhood_attention_checks.h"

#include "cpu/avx2_math.h"

#if defined(__GNUC__)
#define MMBOAT_INLINE inline __attribute__((always_inline))
#define MMBOAT_FLATTEN __attribute__((flatten))
#else
#define MMBOAT_INLINE inline
#define MMBOAT_FLATTEN
#endif

namespace mmboat {
namespace na {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ------------------------------------------------------------------------------------------
// Inner primitives. `base + off[s]` is the row (head_dim values) of slot s.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct GenericOps {
  using acc_t = typename AccOf<scalar_t>::type;

  // out[s] = q . row(s) (+ add[s] when add is not null)
  static MMBOAT_INLINE void dots(const acc_t* __restrict q, const scalar_t* __restrict base,
                                 const int64_t* __restrict off, int n, int dim,
                                 acc_t* __restrict out, const acc_t* __restrict add = nullptr) {
    for (int s = 0; s < n; ++s) {
      const scalar_t* __restrict row = base + off[s];
      acc_t a = 0;
#pragma omp simd reduction(+ : a)
      for (int d = 0; d < dim; ++d) a += q[d] * static_cast<acc_t>(row[d]);
      out[s] = add ? a + add[s] : a;
    }
  }
  // out[s] = q . krow(s) (+ add[s]) and out2[s] = g . vrow(s) over one slot list.
  static MMBOAT_INLINE void dots2(const acc_t* __restrict q, const acc_t* __restrict g,
                                  const scalar_t* __restrict kbase,
                                  const scalar_t* __restrict vbase,
                                  const int64_t* __restrict off, int n, int dim,
                                  acc_t* __restrict out, acc_t* __restrict out2,
                                  const acc_t* __restrict add) {
    dots(q, kbase, off, n, dim, out, add);
    dots(g, vbase, off, n, dim, out2);
  }
  // acc += sum_s w[s] * row(s)
  static MMBOAT_INLINE void weighted_sum(const acc_t* __restrict w,
                                         const scalar_t* __restrict base,
                                         const int64_t* __restrict off, int n, int dim,
                                         acc_t* __restrict acc) {
    for (int s = 0; s < n; ++s) {
      const scalar_t* __restrict row = base + off[s];
      const acc_t ws = w[s];
#pragma omp simd
      for (int d = 0; d < dim; ++d) acc[d] += ws * static_cast<acc_t>(row[d]);
    }
  }
  // y += c * x
  static MMBOAT_INLINE void axpy(acc_t c, const acc_t* __restrict x, acc_t* __restrict y,
                                 int dim) {
#pragma omp simd
    for (int d = 0; d < dim; ++d) y[d] += c * x[d];
  }
  // x[s] = exp(x[s] - shift) for s < n
  static MMBOAT_INLINE void exp_shift(acc_t* __restrict x, int n, acc_t shift) {
    for (int s = 0; s < n; ++s) x[s] = std::exp(x[s] - shift);
  }
  // Gradient rows of the keys u0 + b (b < nu) of one key row, b-th at element offset
  // b * kstride: dk += sum_i ds[coff[i] + u] * qb[i] and dv += sum_i p[coff[i] + u] * gb[i]
  // over the piece's queries lo[b] + shift[g] <= i < hi[b] + shift[g] of each segment g
  // (one per query row that reaches the key row; query rows of dim values). The gradient
  // buffers start uninitialised: key b's rows are set instead of added to when its flag
  // seen[b * sstride] is still 0, and the flag is then set.
  static MMBOAT_INLINE void key_row(const acc_t* __restrict ds, const acc_t* __restrict p,
                                    const int64_t* __restrict coff, const int* __restrict lo,
                                    const int* __restrict hi, const int64_t* __restrict shift,
                                    int nseg, int64_t u0, int nu, const acc_t* __restrict qb,
                                    const acc_t* __restrict gb, acc_t* __restrict dk,
                                    acc_t* __restrict dv, int64_t kstride, int dim,
                                    uint8_t* __restrict seen, int64_t sstride) {
    for (int b = 0; b < nu; ++b) {
      acc_t* __restrict yk = dk + b * kstride;
      acc_t* __restrict yv = dv + b * kstride;
      if (!seen[b * sstride]) {
        seen[b * sstride] = 1;
        std::fill(yk, yk + dim, acc_t(0));
        std::fill(yv, yv + dim, acc_t(0));
      }
      for (int g = 0; g < nseg; ++g)
        for (int64_t i = lo[b] + shift[g]; i < hi[b] + shift[g]; ++i) {
          const acc_t a = ds[coff[i] + u0 + b], c = p[coff[i] + u0 + b];
          const acc_t* __restrict qi = qb + i * dim;
          const acc_t* __restrict gi = gb + i * dim;
#pragma omp simd
          for (int d = 0; d < dim; ++d) {
            yk[d] += a * qi[d];
            yv[d] += c * gi[d];
          }
        }
    }
  }
  static MMBOAT_INLINE acc_t dot(const acc_t* __restrict x, const acc_t* __restrict y,
                                 int dim) {
    acc_t a = 0;
    for (int d = 0; d < dim; ++d) a += x[d] * y[d];
    return a;
  }
  static MMBOAT_INLINE acc_t max_of(const acc_t* __restrict x, int n) {
    acc_t m = x[0];
    for (int j = 1; j < n; ++j) m = std::max(m, x[j]);
    return m;
  }
  static MMBOAT_INLINE acc_t sum_of(const acc_t* __restrict x, int n) {
    acc_t a = 0;
    for (int j = 0; j < n; ++j) a += x[j];
    return a;
  }
};

#if MMBOAT_X86
struct Avx2Ops {
  using acc_t = float;

  // GenericOps::dots, 8 slots at a time with one horizontal reduction. NV = dim / 8 when it
  // is a template constant (the dim loop then unrolls into fixed offsets), 0 for any dim.
  template <int NV>
  MMBOAT_AVX2 static inline void dots_nv(const float* __restrict q,
                                         const float* __restrict base,
                                         const int64_t* __restrict off, int n, int dim,
                                         float* __restrict out, const float* __restrict add) {
    const int nv = NV > 0 ? NV : dim / 8;
    int s = 0;
    for (; s + 8 <= n; s += 8) {
      const float* r[8];
      for (int i = 0; i < 8; ++i) r[i] = base + off[s + i];
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
      for (int v = 0; v < nv; ++v) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * v);
        for (int i = 0; i < 8; ++i)
          a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[i] + 8 * v), a[i]);
      }
      __m256 t = simd::hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
      if (add) t = _mm256_add_ps(t, _mm256_loadu_ps(add + s));
      _mm256_storeu_ps(out + s, t);
    }
    for (; s + 4 <= n; s += 4) {
      const float* r0 = base + off[s + 0];
      const float* r1 = base + off[s + 1];
      const float* r2 = base + off[s + 2];
      const float* r3 = base + off[s + 3];
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
             a3 = _mm256_setzero_ps();
      for (int v = 0; v < nv; ++v) {
        const int d = 8 * v;
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0 + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1 + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2 + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3 + d), a3);
      }
      const __m256 t0 = _mm256_hadd_ps(a0, a1);
      const __m256 t1 = _mm256_hadd_ps(a2, a3);
      const __m256 u = _mm256_hadd_ps(t0, t1);
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
      if (add) r = _mm_add_ps(r, _mm_loadu_ps(add + s));
      _mm_storeu_ps(out + s, r);
    }
    for (; s < n; ++s) {
      const float* r0 = base + off[s];
      __m256 a0 = _mm256_setzero_ps();
      for (int v = 0; v < nv; ++v)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), _mm256_loadu_ps(r0 + 8 * v), a0);
      out[s] = add ? simd::hsum1(a0) + add[s] : simd::hsum1(a0);
    }
  }

  // f(std::integral_constant<int, NV>()) with NV = dim / 8 for the head dims that have their
  // own kernel instances (16, 32, 64), NV = 0 (any multiple of 8) otherwise.
  template <class F>
  MMBOAT_AVX2 static inline void by_head_dim(int dim, const F& f) {
    switch (dim) {
      case 16: return f(std::integral_constant<int, 2>());
      case 32: return f(std::integral_constant<int, 4>());
      case 64: return f(std::integral_constant<int, 8>());
      default: return f(std::integral_constant<int, 0>());
    }
  }

  MMBOAT_AVX2 static inline void dots(const float* __restrict q, const float* __restrict base,
                                      const int64_t* __restrict off, int n, int dim,
                                      float* __restrict out,
                                      const float* __restrict add = nullptr) {
    by_head_dim(dim, [&](auto nv) MMBOAT_AVX2 {
      dots_nv<decltype(nv)::value>(q, base, off, n, dim, out, add);
    });
  }

  // GenericOps::dots2 for 4 slots at a time: the 4 logits and the 4 dO . V sums share one
  // horizontal reduction. NV = dim / 8 when it is a template constant, 0 for any dim.
  template <int NV>
  MMBOAT_AVX2 static inline void dots2_nv(const float* __restrict q, const float* __restrict g,
                                          const float* __restrict kbase,
                                          const float* __restrict vbase,
                                          const int64_t* __restrict off, int n, int dim,
                                          float* __restrict out, float* __restrict out2,
                                          const float* __restrict add) {
    const int nv = NV > 0 ? NV : dim / 8;
    int s = 0;
    for (; s + 4 <= n; s += 4) {
      const float* k0 = kbase + off[s];
      const float* k1 = kbase + off[s + 1];
      const float* k2 = kbase + off[s + 2];
      const float* k3 = kbase + off[s + 3];
      const float* v0 = vbase + off[s];
      const float* v1 = vbase + off[s + 1];
      const float* v2 = vbase + off[s + 2];
      const float* v3 = vbase + off[s + 3];
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
             a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
             b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
      for (int v = 0; v < nv; ++v) {
        const int d = 8 * v;
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
        const __m256 gv = _mm256_loadu_ps(g + d);
        b0 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(v0 + d), b0);
        b1 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(v1 + d), b1);
        b2 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(v2 + d), b2);
        b3 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(v3 + d), b3);
      }
      const __m256 r = simd::hsum8(a0, a1, a2, a3, b0, b1, b2, b3);
      __m128 lo = _mm256_castps256_ps128(r);
      if (add) lo = _mm_add_ps(lo, _mm_loadu_ps(add + s));
      _mm_storeu_ps(out + s, lo);
      _mm_storeu_ps(out2 + s, _mm256_extractf128_ps(r, 1));
    }
    for (; s < n; ++s) {
      const float* k0 = kbase + off[s];
      const float* v0 = vbase + off[s];
      __m256 a0 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps();
      for (int v = 0; v < nv; ++v) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), _mm256_loadu_ps(k0 + 8 * v), a0);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + 8 * v), _mm256_loadu_ps(v0 + 8 * v), b0);
      }
      out[s] = add ? simd::hsum1(a0) + add[s] : simd::hsum1(a0);
      out2[s] = simd::hsum1(b0);
    }
  }

  MMBOAT_AVX2 static inline void dots2(const float* __restrict q, const float* __restrict g,
                                       const float* __restrict kbase,
                                       const float* __restrict vbase,
                                       const int64_t* __restrict off, int n, int dim,
                                       float* __restrict out, float* __restrict out2,
                                       const float* __restrict add) {
    by_head_dim(dim, [&](auto nv) MMBOAT_AVX2 {
      dots2_nv<decltype(nv)::value>(q, g, kbase, vbase, off, n, dim, out, out2, add);
    });
  }

  MMBOAT_AVX2 static inline void weighted_sum(const float* __restrict w,
                                                     const float* __restrict base,
                                                     const int64_t* __restrict off, int n,
                                                     int dim, float* __restrict acc) {
    int d0 = 0;
    for (; d0 + 32 <= dim; d0 += 32) {
      // Two accumulator sets (even / odd slots) to hide the FMA latency.
      __m256 c0 = _mm256_loadu_ps(acc + d0), c1 = _mm256_loadu_ps(acc + d0 + 8),
             c2 = _mm256_loadu_ps(acc + d0 + 16), c3 = _mm256_loadu_ps(acc + d0 + 24);
      __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps(), e2 = _mm256_setzero_ps(),
             e3 = _mm256_setzero_ps();
      int s = 0;
      for (; s + 2 <= n; s += 2) {
        const float* row = base + off[s] + d0;
        const float* row2 = base + off[s + 1] + d0;
        const __m256 ws = _mm256_broadcast_ss(w + s);
        const __m256 ws2 = _mm256_broadcast_ss(w + s + 1);
        c0 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row), c0);
        c1 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 8), c1);
        c2 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 16), c2);
        c3 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 24), c3);
        e0 = _mm256_fmadd_ps(ws2, _mm256_loadu_ps(row2), e0);
        e1 = _mm256_fmadd_ps(ws2, _mm256_loadu_ps(row2 + 8), e1);
        e2 = _mm256_fmadd_ps(ws2, _mm256_loadu_ps(row2 + 16), e2);
        e3 = _mm256_fmadd_ps(ws2, _mm256_loadu_ps(row2 + 24), e3);
      }
      if (s < n) {
        const float* row = base + off[s] + d0;
        const __m256 ws = _mm256_broadcast_ss(w + s);
        c0 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row), c0);
        c1 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 8), c1);
        c2 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 16), c2);
        c3 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 24), c3);
      }
      _mm256_storeu_ps(acc + d0, _mm256_add_ps(c0, e0));
      _mm256_storeu_ps(acc + d0 + 8, _mm256_add_ps(c1, e1));
      _mm256_storeu_ps(acc + d0 + 16, _mm256_add_ps(c2, e2));
      _mm256_storeu_ps(acc + d0 + 24, _mm256_add_ps(c3, e3));
    }
    for (; d0 < dim; d0 += 8) {
      __m256 c0 = _mm256_loadu_ps(acc + d0), e0 = _mm256_setzero_ps();
      int s = 0;
      for (; s + 2 <= n; s += 2) {
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + s), _mm256_loadu_ps(base + off[s] + d0),
                             c0);
        e0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + s + 1),
                             _mm256_loadu_ps(base + off[s + 1] + d0), e0);
      }
      if (s < n)
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + s), _mm256_loadu_ps(base + off[s] + d0),
                             c0);
      _mm256_storeu_ps(acc + d0, _mm256_add_ps(c0, e0));
    }
  }

  // y0 += sum_{lo0 <= i < hi0} c[coff[i] + u] * rows[i] and, when y1 is not null,
  // y1 += sum_{lo1 <= i < hi1} c[coff[i] + u + 1] * rows[i], for NV * 8 columns, with the
  // query ranges shifted by shift[g] for each segment g; the runs grow with the key
  // (lo0 <= lo1, hi0 <= hi1), so a row shared by both keys is loaded once. With set0 / set1
  // the sums are stored instead of added.
  template <int NV>
  MMBOAT_AVX2 static inline void pair_sums(const float* __restrict c,
                                           const int64_t* __restrict coff, int lo0, int hi0,
                                           int lo1, int hi1, const int64_t* __restrict shift,
                                           int nseg, int64_t u, const float* __restrict rows,
                                           int dim, float* __restrict y0,
                                           float* __restrict y1, bool set0, bool set1) {
    __m256 a0[NV], a1[NV];
    for (int v = 0; v < NV; ++v) a0[v] = a1[v] = _mm256_setzero_ps();
    if (!y1) lo1 = hi1 = hi0;
    for (int g = 0; g < nseg; ++g) {
      const int64_t sh = shift[g];
      int64_t i = lo0 + sh;
      for (const int64_t e = std::min(hi0, lo1) + sh; i < e; ++i) {
        const __m256 w0 = _mm256_broadcast_ss(c + coff[i] + u);
        const float* x = rows + i * dim;
        for (int v = 0; v < NV; ++v)
          a0[v] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + 8 * v), a0[v]);
      }
      for (i = lo1 + sh; i < hi0 + sh; ++i) {
        const float* cc = c + coff[i] + u;
        const __m256 w0 = _mm256_broadcast_ss(cc), w1 = _mm256_broadcast_ss(cc + 1);
        const float* x = rows + i * dim;
        for (int v = 0; v < NV; ++v) {
          // One load for both keys: the empty asm keeps xv in a register (compilers
          // otherwise fold the load into both FMAs, and the loads, not the FMAs, set the
          // pace: two vector loads per cycle).
          __m256 xv = _mm256_loadu_ps(x + 8 * v);
          asm("" : "+x"(xv));
          a0[v] = _mm256_fmadd_ps(w0, xv, a0[v]);
          a1[v] = _mm256_fmadd_ps(w1, xv, a1[v]);
        }
      }
      for (i = std::max(lo1, hi0) + sh; i < hi1 + sh; ++i) {
        const __m256 w1 = _mm256_broadcast_ss(c + coff[i] + u + 1);
        const float* x = rows + i * dim;
        for (int v = 0; v < NV; ++v)
          a1[v] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8 * v), a1[v]);
      }
    }
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(y0 + 8 * v,
                       set0 ? a0[v] : _mm256_add_ps(_mm256_loadu_ps(y0 + 8 * v), a0[v]));
    if (y1)
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(y1 + 8 * v,
                         set1 ? a1[v] : _mm256_add_ps(_mm256_loadu_ps(y1 + 8 * v), a1[v]));
  }

  // See GenericOps::key_row; keys go in pairs, 32 columns at a time, dK and dV apart, with
  // the sums in registers.
  MMBOAT_AVX2 static inline void key_row(const float* __restrict ds, const float* __restrict p,
                                         const int64_t* __restrict coff,
                                         const int* __restrict lo, const int* __restrict hi,
                                         const int64_t* __restrict shift, int nseg, int64_t u0,
                                         int nu, const float* __restrict qb,
                                         const float* __restrict gb, float* __restrict dk,
                                         float* __restrict dv, int64_t kstride, int dim,
                                         uint8_t* __restrict seen, int64_t sstride) {
    for (int b = 0; b < nu; b += 2) {
      const bool two = b + 1 < nu;
      const int lo1 = two ? lo[b + 1] : 0, hi1 = two ? hi[b + 1] : 0;
      const bool set0 = !seen[b * sstride], set1 = two && !seen[(b + 1) * sstride];
      seen[b * sstride] = 1;
      if (two) seen[(b + 1) * sstride] = 1;
      float* yk = dk + b * kstride;
      float* yv = dv + b * kstride;
      int d0 = 0;
      for (; d0 + 32 <= dim; d0 += 32) {
        pair_sums<4>(ds, coff, lo[b], hi[b], lo1, hi1, shift, nseg, u0 + b, qb + d0, dim,
                     yk + d0, two ? yk + kstride + d0 : nullptr, set0, set1);
        pair_sums<4>(p, coff, lo[b], hi[b], lo1, hi1, shift, nseg, u0 + b, gb + d0, dim,
                     yv + d0, two ? yv + kstride + d0 : nullptr, set0, set1);
      }
      for (; d0 < dim; d0 += 8) {
        pair_sums<1>(ds, coff, lo[b], hi[b], lo1, hi1, shift, nseg, u0 + b, qb + d0, dim,
                     yk + d0, two ? yk + kstride + d0 : nullptr, set0, set1);
        pair_sums<1>(p, coff, lo[b], hi[b], lo1, hi1, shift, nseg, u0 + b, gb + d0, dim,
                     yv + d0, two ? yv + kstride + d0 : nullptr, set0, set1);
      }
    }
  }

  MMBOAT_AVX2 static inline float dot(const float* __restrict x, const float* __restrict y,
                                      int dim) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int d = 0;
    for (; d + 16 <= dim; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + d + 8), _mm256_loadu_ps(y + d + 8), a1);
    }
    if (d < dim) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d), a0);
    return simd::hsum1(_mm256_add_ps(a0, a1));
  }

  MMBOAT_AVX2 static inline float max_of(const float* __restrict x, int n) {
    if (n < 8) {
      float m = x[0];
      for (int j = 1; j < n; ++j) m = std::max(m, x[j]);
      return m;
    }
    __m256 m0 = _mm256_loadu_ps(x);
    int s = 8;
    for (; s + 8 <= n; s += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + s));
    if (s < n) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + n - 8));  // overlapping tail
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }

  MMBOAT_AVX2 static inline float sum_of(const float* __restrict x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int s = 0;
    for (; s + 16 <= n; s += 16) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + s));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + s + 8));
    }
    for (; s + 8 <= n; s += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + s));
    float tail = 0;
    for (; s < n; ++s) tail += x[s];
    return simd::hsum1(_mm256_add_ps(a0, a1)) + tail;
  }

  MMBOAT_AVX2 static inline void axpy(float c, const float* __restrict x,
                                             float* __restrict y, int dim) {
    const __m256 cv = _mm256_set1_ps(c);
    for (int d = 0; d < dim; d += 8)
      _mm256_storeu_ps(y + d, _mm256_fmadd_ps(cv, _mm256_loadu_ps(x + d),
                                              _mm256_loadu_ps(y + d)));
  }

  // exp(x) for x <= ~88: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (Cephes polynomial,
  // ~2 ulp); inputs below -87 flush to 0.
  MMBOAT_AVX2 static inline __m256 exp8(__m256 x) {
    const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }

  // x[s] = exp(x[s] - shift) for s < n; x has room for n rounded up to a multiple of 8, and
  // the entries from n to there are overwritten.
  MMBOAT_AVX2 static inline void exp_shift(float* __restrict x, int n, float shift) {
    const __m256 sv = _mm256_set1_ps(shift);
    for (int s = 0; s < n; s += 8)
      _mm256_storeu_ps(x + s, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), sv)));
  }
};

#endif

// ------------------------------------------------------------------------------------------
// Problem description and the window of one query.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Problem {
  using acc_t = typename AccOf<scalar_t>::type;
  Shape3d s;
  acc_t scale = 1;
  const scalar_t* rpb = nullptr;  // [heads, bias extents...]
  int64_t bstride[3] = {0, 0, 0};  // rpb strides of the three axes
};

// Slot lists of the queries in one row (fixed first two coordinates).
struct RowWindow {
  int nrows = 0;
  int64_t row_off[512];   // token offset of each valid (axis0, axis1) key row
  int64_t row_bias[512];  // rpb offset of each valid key row (within one head)
  int row_slot[512];      // full-layout slot of the row's first key (a * k1 + b) * k2
};

template <typename scalar_t>
MMBOAT_INLINE void build_row(const Problem<scalar_t>& P, int64_t t, int64_t h, RowWindow& rw) {
  const Shape3d& s = P.s;
  const AxisWindow w0 = axis_window(int(t), int(s.size[0]), s.kernel[0], s.dilation[0],
                                    s.causal[0]);
  const AxisWindow w1 = axis_window(int(h), int(s.size[1]), s.kernel[1], s.dilation[1],
                                    s.causal[1]);
  rw.nrows = 0;
  for (int a = 0; a < w0.count; ++a) {
    for (int b = 0; b < w1.count; ++b) {
      const int64_t kt = w0.start + int64_t(a) * s.dilation[0];
      const int64_t kh = w1.start + int64_t(b) * s.dilation[1];
      rw.row_off[rw.nrows] = (kt * s.size[1] + kh) * s.size[2];
      rw.row_bias[rw.nrows] =
          (w0.bias_start + a) * P.bstride[0] + (w1.bias_start + b) * P.bstride[1];
      rw.row_slot[rw.nrows] = (a * s.kernel[1] + b) * s.kernel[2];
      ++rw.nrows;
    }
  }
}

// Element offsets (relative to the (b, head) base) and rpb offsets of the valid slots of query
// column w; returns their count. `slot` receives full-layout slot indices when not null.
template <typename scalar_t>
MMBOAT_INLINE int build_slots(const Problem<scalar_t>& P, const RowWindow& rw, int64_t w,
                              int64_t* __restrict off, int64_t* __restrict bias,
                              int* __restrict slot) {
  const Shape3d& s = P.s;
  const AxisWindow w2 = axis_window(int(w), int(s.size[2]), s.kernel[2], s.dilation[2],
                                    s.causal[2]);
  const int64_t dim = s.dim;
  const int64_t step = int64_t(s.dilation[2]) * dim;
  int n = 0;
  for (int r = 0; r < rw.nrows; ++r) {
    int64_t o = (rw.row_off[r] + w2.start) * dim;
    const int64_t bo = rw.row_bias[r] + w2.bias_start;
    for (int c = 0; c < w2.count; ++c, ++n, o += step) {
      off[n] = o;
      bias[n] = bo + c;
      if (slot) slot[n] = rw.row_slot[r] + c;
    }
  }
  return n;
}

// Slot lists shared by every query of one (axis0, axis1) row when the last axis is not causal
// (all windows then have the same shape): element offsets relative to the window's first key,
// rpb indices relative to the window's bias start, and the rpb values of every possible bias
// start (0 .. k2 - 1) laid out per slot, so a query adds its bias with one contiguous read.
template <typename acc_t>
struct FixedRow {
  int n = 0;
  std::vector<int64_t> off, bidx;
  std::vector<acc_t> bias;  // [k2][n]
};

template <typename scalar_t, typename acc_t>
MMBOAT_INLINE void build_fixed(const Problem<scalar_t>& P, const RowWindow& rw,
                               const scalar_t* rpb, FixedRow<acc_t>& fr) {
  const Shape3d& s = P.s;
  const int k2 = s.kernel[2];
  const int64_t d2 = s.dilation[2];
  fr.n = rw.nrows * k2;
  fr.off.resize(fr.n);
  fr.bidx.resize(fr.n);
  for (int r = 0; r < rw.nrows; ++r)
    for (int c = 0; c < k2; ++c) {
      fr.off[r * k2 + c] = (rw.row_off[r] + c * d2) * s.dim;
      fr.bidx[r * k2 + c] = rw.row_bias[r] + c;
    }
  if (rpb) {
    fr.bias.resize(int64_t(k2) * fr.n + 8);
    for (int bs = 0; bs < k2; ++bs)
      for (int j = 0; j < fr.n; ++j)
        fr.bias[bs * fr.n + j] = static_cast<acc_t>(rpb[fr.bidx[j] + bs]);
  }
}

// ------------------------------------------------------------------------------------------
// Task layout of the scatter (backward) kernels.
// ------------------------------------------------------------------------------------------
struct TaskGrid {
  int axis = 0;       // blocked axis
  int64_t block = 1;  // in-group indices per block
  int64_t groups = 1, blocks = 1;  // per (b, head)
  int64_t per_bh() const { return groups * blocks; }
};

TaskGrid make_grid(const Shape3d& s) {
  TaskGrid g;
  g.axis = s.size[0] > 1 ? 0 : (s.size[1] > 1 ? 1 : 2);
  const int k = s.kernel[g.axis];
  const int d = s.dilation[g.axis];
  g.block = std::max(2 * k - 2, 1);
  g.groups = d;
  const int64_t max_group_len = (s.size[g.axis] + d - 1) / d;
  g.blocks = (max_group_len + g.block - 1) / g.block;
  return g;
}

// Runs fn(task, bh, t, h, nh, w_begin, w_end, w_step) over every query row piece of each
// task, in two phases (even blocks, then odd blocks) so concurrently running tasks write
// disjoint keys. `task` indexes [0, batch * heads * per_bh). A piece blocked along axis 1
// covers nh <= piece_rows rows of the task's group: h, h + dilation, ...; otherwise nh is 1.
template <typename Fn>
void run_phased(const Shape3d& s, const TaskGrid& g, int piece_rows, const Fn& fn) {
  const int64_t bh_count = s.batch * s.heads;
  const int64_t half = (g.blocks + 1) / 2;
  for (int phase = 0; phase < 2; ++phase) {
    const int64_t nblocks = phase == 0 ? half : g.blocks / 2;
    const int64_t ntasks = bh_count * g.groups * nblocks;
    if (ntasks == 0) continue;
    at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / (g.groups * nblocks);
        const int64_t rem = i % (g.groups * nblocks);
        const int64_t grp = rem / nblocks;
        const int64_t blk = 2 * (rem % nblocks) + phase;
        const int64_t task = (bh * g.groups + grp) * g.blocks + blk;
        const int d = s.dilation[g.axis];
        const int64_t first = (blk * g.block) * d + grp;
        const int64_t last = std::min(((blk + 1) * g.block) * d + grp, s.size[g.axis]);
        if (first >= s.size[g.axis]) continue;
        // Wide maps are walked in strips of kStrip columns so that the keys (and their
        // gradient rows) of consecutive query rows stay in the L2 cache.
        constexpr int64_t kStrip = 64;
        const int one = 1;
        if (g.axis == 2) {
          fn(task, bh, int64_t(0), int64_t(0), one, first, last, int64_t(d));
        } else if (g.axis == 1) {
          const int64_t hstep = int64_t(piece_rows) * d;
          for (int64_t ws = 0; ws < s.size[2]; ws += kStrip)
            for (int64_t h = first; h < last; h += hstep) {
              const int nh = int(std::min<int64_t>(piece_rows, (last - h + d - 1) / d));
              fn(task, bh, int64_t(0), h, nh, ws, std::min(ws + kStrip, s.size[2]),
                 int64_t(1));
            }
        } else {
          for (int64_t ws = 0; ws < s.size[2]; ws += kStrip)
            for (int64_t t = first; t < last; t += d)
              for (int64_t h = 0; h < s.size[1]; ++h)
                fn(task, bh, t, h, one, ws, std::min(ws + kStrip, s.size[2]), int64_t(1));
        }
      }
    });
  }
}

// Sums per-task rpb partials [tasks, bias_size] into [heads, bias_size] in task order.
template <typename acc_t>
void reduce_bias(const Shape3d& s, const TaskGrid& g, const std::vector<acc_t>& part,
                 acc_t* out) {
  const int64_t bs = s.bias_size();
  std::fill(out, out + s.heads * bs, acc_t(0));
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t t = 0; t < g.per_bh(); ++t) {
        const acc_t* src = part.data() + ((b * s.heads + h) * g.per_bh() + t) * bs;
        acc_t* dst = out + h * bs;
        for (int64_t i = 0; i < bs; ++i) dst[i] += src[i];
      }
}

// Query rows per piece of the fused backward (pass 2 then reads and writes each key's gradient
// rows once for all of them).
constexpr int kPieceRows = 4;

// Thread scratch sized for one query; the backward adds the per-piece buffers.
template <typename acc_t>
struct Scratch {
  std::vector<int64_t> off, bias;
  std::vector<int> slot;
  std::vector<acc_t> a, b, q, acc;
  FixedRow<acc_t> fixed[kPieceRows];
  // Backward piece: p and ds per query (rows of pstride), q * scale and grad_out per query,
  // window start / end (in dilation-group units) and size per query, per-query offsets of a
  // key row's coefficients, ds row sums per rpb start.
  int64_t pstride = 0;
  std::vector<acc_t> pp, pds, pq, pg, dsum;
  std::vector<int64_t> su, eu, coff;
  std::vector<int> cnt, lo, hi;  // lo / hi: run of queries holding each key of a group
  std::vector<int64_t> shift;    // key_row: query-index shift of each row segment
  std::vector<char> bs_used;
  Scratch(int64_t slots, int64_t dim)
      : off(slots), bias(slots), slot(slots), a(slots + 8), b(slots + 8), q(dim), acc(dim),
        pstride(slots + 8) {}
  void piece(int64_t n, int64_t dim) {
    if (int64_t(cnt.size()) >= n) return;
    pp.resize(n * pstride);
    pds.resize(n * pstride);
    pq.resize(n * dim);
    pg.resize(n * dim);
    su.resize(n);
    eu.resize(n);
    coff.resize(n);
    cnt.resize(n);
  }
  void runs(int nu) {
    if (int(lo.size()) < nu) {
      lo.resize(nu);
      hi.resize(nu);
    }
  }
};

// ------------------------------------------------------------------------------------------
// Fused forward.
// ------------------------------------------------------------------------------------------
template <class Ops, typename scalar_t>
MMBOAT_INLINE void fused_forward_range(const Problem<scalar_t>& P, const scalar_t* q,
                                       const scalar_t* k, const scalar_t* v, scalar_t* out,
                                       typename AccOf<scalar_t>::type* lse, int64_t begin,
                                       int64_t end, int64_t wchunk) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Shape3d& s = P.s;
  const int dim = int(s.dim);
  const int64_t hw = s.size[1] * s.size[2];
  const int64_t bh_stride = s.tokens() * s.dim;
  const int64_t nchunks = (s.size[2] + wchunk - 1) / wchunk;
  Scratch<acc_t> sc(s.slots(), s.dim);
  RowWindow rw;
  FixedRow<acc_t> fr;
  const bool fixed = !s.causal[2];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % nchunks;
    const int64_t row = task / nchunks;  // (bh, t, h)
    const int64_t bh = row / (s.size[0] * s.size[1]);
    const int64_t th = row % (s.size[0] * s.size[1]);
    const int64_t t = th / s.size[1], h = th % s.size[1];
    build_row(P, t, h, rw);
    const scalar_t* kb = k + bh * bh_stride;
    const scalar_t* vb = v + bh * bh_stride;
    const scalar_t* rpb = P.rpb ? P.rpb + (bh % s.heads) * s.bias_size() : nullptr;
    if (fixed) build_fixed(P, rw, rpb, fr);
    const int64_t w_end = std::min((chunk + 1) * wchunk, s.size[2]);
    for (int64_t w = chunk * wchunk; w < w_end; ++w) {
      const int64_t tok = bh * s.tokens() + t * hw + h * s.size[2] + w;
      const scalar_t* qi = q + tok * s.dim;
      for (int d = 0; d < dim; ++d) sc.q[d] = static_cast<acc_t>(qi[d]) * P.scale;
      acc_t* logit = sc.a.data();
      int n;
      const scalar_t *kq = kb, *vq = vb;
      const int64_t* offp = sc.off.data();
      if (fixed) {
        const AxisWindow w2 = axis_window(int(w), int(s.size[2]), s.kernel[2], s.dilation[2],
                                          false);
        n = fr.n;
        kq = kb + w2.start * s.dim;
        vq = vb + w2.start * s.dim;
        offp = fr.off.data();
        Ops::dots(sc.q.data(), kq, offp, n, dim, logit,
                  rpb ? fr.bias.data() + int64_t(w2.bias_start) * n : nullptr);
      } else {
        n = build_slots(P, rw, w, sc.off.data(), sc.bias.data(), nullptr);
        Ops::dots(sc.q.data(), kb, offp, n, dim, logit);
        if (rpb)
          for (int j = 0; j < n; ++j) logit[j] += static_cast<acc_t>(rpb[sc.bias[j]]);
      }
      const acc_t m = Ops::max_of(logit, n);
      Ops::exp_shift(logit, n, m);
      const acc_t sum = Ops::sum_of(logit, n);
      const acc_t inv = acc_t(1) / sum;  // normalise the output, not the n weights
      std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
      Ops::weighted_sum(logit, vq, offp, n, dim, sc.acc.data());
      scalar_t* oi = out + tok * s.dim;
      for (int d = 0; d < dim; ++d) oi[d] = static_cast<scalar_t>(sc.acc[d] * inv);
      lse[tok] = m + std::log(sum);
    }
  }
}

// Fast paths: the float overloads run the AVX2 kernels; the template says "not handled".
template <typename scalar_t>
bool forward_fast(const Problem<scalar_t>&, const scalar_t*, const scalar_t*, const scalar_t*,
                  scalar_t*, typename AccOf<scalar_t>::type*, int64_t, int64_t, int64_t) {
  return false;
}

#if MMBOAT_X86
MMBOAT_AVX2 MMBOAT_FLATTEN void fused_forward_range_avx2(const Problem<float>& P, const float* q,
                                          const float* k, const float* v, float* out,
                                          float* lse, int64_t begin, int64_t end,
                                          int64_t wchunk) {
  fused_forward_range<Avx2Ops, float>(P, q, k, v, out, lse, begin, end, wchunk);
}

bool forward_fast(const Problem<float>& P, const float* q, const float* k, const float* v,
                  float* out, float* lse, int64_t begin, int64_t end, int64_t wchunk) {
  fused_forward_range_avx2(P, q, k, v, out, lse, begin, end, wchunk);
  return true;
}
#endif

template <typename scalar_t>
Problem<scalar_t> make_problem(const Shape3d& s, double scale, const at::Tensor& rpb) {
  Problem<scalar_t> P;
  P.s = s;
  P.scale = static_cast<typename Problem<scalar_t>::acc_t>(scale);
  P.rpb = rpb.defined() ? rpb.data_ptr<scalar_t>() : nullptr;
  P.bstride[2] = 1;
  P.bstride[1] = s.bias_extent(2);
  P.bstride[0] = s.bias_extent(1) * s.bias_extent(2);
  return P;
}

template <typename scalar_t>
bool use_avx2(const Shape3d& s) {
#if MMBOAT_X86
  return std::is_same<scalar_t, float>::value && s.dim % 8 == 0 && simd::cpu_has_avx2();
#else
  return false;
#endif
}

void check_window_rows(const Shape3d& s) {
  TORCH_CHECK(int64_t(s.kernel[0]) * s.kernel[1] <= 512,
              "neighborhood attention (CPU): kernel_size product over the leading axes must "
              "be <= 512");
}

std::tuple<at::Tensor, at::Tensor> fused_forward(int nd, const at::Tensor& query,
                                                 const at::Tensor& key, const at::Tensor& value,
                                                 const c10::optional<at::Tensor>& rpb_opt,
                                                 at::IntArrayRef kernel_size,
                                                 at::IntArrayRef dilation,
                                                 const c10::List<bool>& is_causal, double scale) {
  const char* op = nd == 1 ? "na1d_forward" : nd == 2 ? "na2d_forward" : "na3d_forward";
  const Shape3d s = check_fused_forward(op, nd, query, key, value, rpb_opt, kernel_size,
                                        dilation, is_causal);
  check_window_rows(s);
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty(query.sizes().slice(0, query.dim() - 1),
                             query.options().dtype(lse_dtype(query.scalar_type())));
  if (query.numel() == 0) return {out, lse};
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  const int64_t wchunk = 64;
  const int64_t ntasks = s.batch * s.heads * s.size[0] * s.size[1] *
                         ((s.size[2] + wchunk - 1) / wchunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const auto P = make_problem<scalar_t>(s, scale, rpb);
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* l = lse.data_ptr<acc_t>();
    const bool avx2 = use_avx2<scalar_t>(s);
    at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
      if (avx2 && forward_fast(P, q, k, v, o, l, begin, end, wchunk)) return;
      fused_forward_range<GenericOps<scalar_t>, scalar_t>(P, q, k, v, o, l, begin, end, wchunk);
    });
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------
// Fused backward.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = typename AccOf<scalar_t>::type;
  const scalar_t *dout, *q, *k, *v, *out;
  const acc_t* lse;
  scalar_t* dq;
  acc_t *dk, *dv;    // accumulation buffers, key layout, uninitialised until first written
  acc_t* dbias;      // [tasks, bias_size] or null
  uint8_t* seen;     // per key token: dk / dv rows written yet
};

// One piece of nq <= kPieceRows query rows (the queries w0, w0 + wstep, ... < w1 of each,
// taken per dilation group of the last axis), in two passes:
//  1. query by query: logits and dO . V over the window, p from the saved log-sum-exp,
//     ds = p * (dO . V - delta) and dQ; p and ds of every query of the piece are kept;
//  2. key by key, for each key row the piece reaches: dK += sum ds * q * scale and
//     dV += sum p * dO over the piece's queries whose window holds the key. Window starts and
//     ends grow with the query, so in each query row these queries are a contiguous run of
//     the group (found by two pointers, the same in every row), and the key's gradient rows
//     are read and written once per piece, for all its query rows together.
template <class Ops, typename scalar_t>
MMBOAT_INLINE void fused_backward_row(const Problem<scalar_t>& P, const BackwardArgs<scalar_t>& A,
                                      Scratch<typename AccOf<scalar_t>::type>& sc,
                                      RowWindow* rws, int64_t task, int64_t bh, int64_t t,
                                      int64_t h, int nq, int64_t w0, int64_t w1,
                                      int64_t wstep) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Shape3d& s = P.s;
  const int dim = int(s.dim);
  const int64_t bh_stride = s.tokens() * s.dim;
  int64_t hq[kPieceRows];  // query rows
  for (int j = 0; j < nq; ++j) hq[j] = h + int64_t(j) * s.dilation[1];
  const scalar_t* kb = A.k + bh * bh_stride;
  const scalar_t* vb = A.v + bh * bh_stride;
  acc_t* dkb = A.dk + bh * bh_stride;
  acc_t* dvb = A.dv + bh * bh_stride;
  uint8_t* seenb = A.seen + bh * s.tokens();
  const scalar_t* rpb = P.rpb ? P.rpb + (bh % s.heads) * s.bias_size() : nullptr;
  acc_t* dbias = A.dbias ? A.dbias + task * s.bias_size() : nullptr;
  const bool fixed = !s.causal[2];
  const int d2 = s.dilation[2];
  const int k2 = s.kernel[2];
  const int64_t ngroups = wstep == d2 ? 1 : std::min<int64_t>(d2, w1 - w0);
  const int64_t gstep = wstep == d2 ? wstep : d2;
  // Queries of group grp in one row of the piece.
  const auto group_len = [&](int64_t grp) {
    return w0 + grp < w1 ? (w1 - (w0 + grp) + gstep - 1) / gstep : int64_t(0);
  };
  int64_t m_row = 0;  // queries per row; row j's are the piece's [j * m_row, (j + 1) * m_row)
  for (int64_t grp = 0; grp < ngroups; ++grp) m_row += group_len(grp);
  const int64_t ps = sc.pstride;
  sc.piece(nq * m_row, dim);

  // Pass 1.
  for (int j = 0; j < nq; ++j) {
    RowWindow& rw = rws[j];
    FixedRow<acc_t>& fr = sc.fixed[j];
    build_row(P, t, hq[j], rw);
    if (fixed) build_fixed(P, rw, rpb, fr);
    // Row sums of ds per window bias start (fixed rows): the rpb gradient is scattered once
    // per row and bias start instead of once per query.
    const bool bias_sums = dbias && fixed;
    const int nfix = fixed ? fr.n : 0;
    if (bias_sums) {
      sc.dsum.assign(int64_t(k2) * nfix, acc_t(0));
      sc.bs_used.assign(k2, 0);
    }
    int64_t idx = j * m_row;
    for (int64_t grp = 0; grp < ngroups; ++grp) {
      for (int64_t w = w0 + grp; w < w1; w += gstep, ++idx) {
        const AxisWindow win = axis_window(int(w), int(s.size[2]), k2, d2, s.causal[2]);
        sc.su[idx] = win.start / d2;
        sc.eu[idx] = win.start / d2 + win.count - 1;
        sc.cnt[idx] = win.count;
        const int64_t tok = bh * s.tokens() + (t * s.size[1] + hq[j]) * s.size[2] + w;
        int n;
        const scalar_t *kq = kb, *vq = vb;
        const int64_t* offp = sc.off.data();
        if (fixed) {
          n = fr.n;
          kq = kb + win.start * s.dim;
          vq = vb + win.start * s.dim;
          offp = fr.off.data();
        } else {
          n = build_slots(P, rw, w, sc.off.data(), sc.bias.data(), nullptr);
        }
        const scalar_t* qi = A.q + tok * s.dim;
        const scalar_t* gi = A.dout + tok * s.dim;
        const scalar_t* oi = A.out + tok * s.dim;
        acc_t* qv = sc.pq.data() + idx * dim;  // q * scale
        acc_t* gv = sc.pg.data() + idx * dim;
        acc_t delta;
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          for (int d = 0; d < dim; ++d) qv[d] = qi[d] * P.scale;
          std::copy(gi, gi + dim, gv);
          delta = Ops::dot(gi, oi, dim);
        } else {
          delta = 0;
          for (int d = 0; d < dim; ++d) {
            qv[d] = static_cast<acc_t>(qi[d]) * P.scale;
            gv[d] = static_cast<acc_t>(gi[d]);
            delta += gv[d] * static_cast<acc_t>(oi[d]);
          }
        }
        acc_t* p = sc.pp.data() + idx * ps;
        acc_t* ds = sc.pds.data() + idx * ps;
        Ops::dots2(qv, gv, kq, vq, offp, n, dim, p, ds,
                   fixed && rpb ? fr.bias.data() + int64_t(win.bias_start) * n : nullptr);
        if (!fixed && rpb)
          for (int jj = 0; jj < n; ++jj) p[jj] += static_cast<acc_t>(rpb[sc.bias[jj]]);
        Ops::exp_shift(p, n, A.lse[tok]);
        for (int jj = 0; jj < n; ++jj) ds[jj] = p[jj] * (ds[jj] - delta);
        if (bias_sums) {
          acc_t* db = sc.dsum.data() + int64_t(win.bias_start) * n;
          for (int jj = 0; jj < n; ++jj) db[jj] += ds[jj];
          sc.bs_used[win.bias_start] = 1;
        } else if (dbias) {
          for (int jj = 0; jj < n; ++jj) dbias[sc.bias[jj]] += ds[jj];
        }
        std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
        Ops::weighted_sum(ds, kq, offp, n, dim, sc.acc.data());
        scalar_t* dqi = A.dq + tok * s.dim;
        for (int d = 0; d < dim; ++d) dqi[d] = static_cast<scalar_t>(sc.acc[d] * P.scale);
      }
    }
    if (bias_sums)
      for (int bs = 0; bs < k2; ++bs) {
        if (!sc.bs_used[bs]) continue;
        const acc_t* src = sc.dsum.data() + int64_t(bs) * nfix;
        for (int jj = 0; jj < nfix; ++jj) dbias[fr.bidx[jj] + bs] += src[jj];
      }
  }

  // Pass 2. Key rows of the piece: row_off ascending in each query row's window, merged;
  // kr[j] is the key row's index in query row j's window (-1 when it is not there).
  sc.shift.resize(kPieceRows);
  const auto key_runs = [&](int64_t a, int64_t b, int64_t res) {
    if (a >= b) return;
    const int64_t u0 = sc.su[a];
    const int nu = int(sc.eu[b - 1] - u0 + 1);
    sc.runs(nu);
    int64_t lo = a, hi = a;
    for (int c = 0; c < nu; ++c) {  // queries lo <= i < hi hold key u0 + c
      while (hi < b && sc.su[hi] <= u0 + c) ++hi;
      while (lo < hi && sc.eu[lo] < u0 + c) ++lo;
      sc.lo[c] = int(lo);
      sc.hi[c] = int(hi);
    }
    constexpr int64_t kEnd = std::numeric_limits<int64_t>::max();
    int r[kPieceRows] = {};
    for (;;) {
      int64_t row = kEnd;
      for (int j = 0; j < nq; ++j)
        if (r[j] < rws[j].nrows) row = std::min(row, rws[j].row_off[r[j]]);
      if (row == kEnd) break;
      int kr[kPieceRows];
      for (int j = 0; j < nq; ++j)
        kr[j] = r[j] < rws[j].nrows && rws[j].row_off[r[j]] == row ? r[j]++ : -1;
      int nseg = 0;
      for (int j = 0; j < nq; ++j) {
        if (kr[j] < 0) continue;
        const int64_t sh = j * m_row;
        for (int64_t i = a + sh; i < b + sh; ++i)
          sc.coff[i] = i * ps + kr[j] * sc.cnt[i] - sc.su[i];
        sc.shift[nseg++] = sh;
      }
      const int64_t key = row + res + u0 * d2;  // token
      Ops::key_row(sc.pds.data(), sc.pp.data(), sc.coff.data(), sc.lo.data(), sc.hi.data(),
                   sc.shift.data(), nseg, u0, nu, sc.pq.data(), sc.pg.data(),
                   dkb + key * s.dim, dvb + key * s.dim, int64_t(d2) * s.dim, dim,
                   seenb + key, d2);
    }
  };
  int64_t first = 0;
  for (int64_t grp = 0; grp < ngroups; ++grp) {
    const int64_t last = first + group_len(grp);
    const int64_t res = (w0 + grp) % d2;  // every window of the group starts in this residue
    key_runs(first, last, res);
    first = last;
  }
}

template <typename scalar_t>
bool backward_fast(const Problem<scalar_t>&, const BackwardArgs<scalar_t>&,
                   Scratch<typename AccOf<scalar_t>::type>&, RowWindow*, int64_t, int64_t,
                   int64_t, int64_t, int, int64_t, int64_t, int64_t) {
  return false;
}

#if MMBOAT_X86
MMBOAT_AVX2 MMBOAT_FLATTEN void fused_backward_row_avx2(
    const Problem<float>& P, const BackwardArgs<float>& A, Scratch<float>& sc, RowWindow* rws,
    int64_t task, int64_t bh, int64_t t, int64_t h, int nh, int64_t w0, int64_t w1,
    int64_t wstep) {
  fused_backward_row<Avx2Ops, float>(P, A, sc, rws, task, bh, t, h, nh, w0, w1, wstep);
}

bool backward_fast(const Problem<float>& P, const BackwardArgs<float>& A, Scratch<float>& sc,
                   RowWindow* rws, int64_t task, int64_t bh, int64_t t, int64_t h, int nh,
                   int64_t w0, int64_t w1, int64_t wstep) {
  fused_backward_row_avx2(P, A, sc, rws, task, bh, t, h, nh, w0, w1, wstep);
  return true;
}
#endif

// Float accumulation buffer for a gradient of `like`'s shape (zero-filled or not): the output
// itself when the dtype already is the accumulation type.
template <typename acc_t>
at::Tensor accumulation_buffer(const at::Tensor& like, bool zeroed = true) {
  const auto options = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  return zeroed ? at::zeros(like.sizes(), options) : at::empty(like.sizes(), options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> fused_backward(
    int nd, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& rpb_opt, const at::Tensor& out,
    const at::Tensor& logsumexp, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    const c10::List<bool>& is_causal, double scale) {
  const char* op = nd == 1 ? "na1d_backward" : nd == 2 ? "na2d_backward" : "na3d_backward";
  const Shape3d s = check_fused_backward(op, nd, grad_out, query, key, value, rpb_opt, out,
                                         logsumexp, kernel_size, dilation, is_causal);
  check_window_rows(s);
  const at::Tensor rpb = s.has_rpb ? *rpb_opt : at::Tensor();
  at::Tensor dq = at::empty_like(query);
  at::Tensor dk, dv, drpb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    // dK and dV are written by the kernels (see key_row), not zero-filled first.
    at::Tensor dk_acc = accumulation_buffer<acc_t>(key, false);
    at::Tensor dv_acc = accumulation_buffer<acc_t>(value, false);
    at::Tensor drpb_acc;
    if (s.has_rpb) drpb_acc = at::zeros(rpb.sizes(), rpb.options().dtype(dk_acc.scalar_type()));
    if (query.numel() > 0) {
      const auto P = make_problem<scalar_t>(s, scale, rpb);
      const TaskGrid g = make_grid(s);
      std::vector<acc_t> dbias;
      if (s.has_rpb) dbias.assign(s.batch * s.heads * g.per_bh() * s.bias_size(), acc_t(0));
      std::vector<uint8_t> seen(s.batch * s.heads * s.tokens(), 0);
      BackwardArgs<scalar_t> A{grad_out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(),
                               key.data_ptr<scalar_t>(),      value.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(),      logsumexp.data_ptr<acc_t>(),
                               dq.data_ptr<scalar_t>(),       dk_acc.data_ptr<acc_t>(),
                               dv_acc.data_ptr<acc_t>(),      s.has_rpb ? dbias.data() : nullptr,
                               seen.data()};
      const bool avx2 = use_avx2<scalar_t>(s);
      // One scratch per thread, reused across tasks.
      std::vector<std::unique_ptr<Scratch<acc_t>>> scratch(at::get_num_threads() + 1);
      std::vector<std::unique_ptr<RowWindow[]>> rows(at::get_num_threads() + 1);
      run_phased(s, g, kPieceRows, [&](int64_t task, int64_t bh, int64_t t, int64_t h, int nh,
                                 int64_t w0, int64_t w1, int64_t wstep) {
        const int tid = std::min<int>(at::get_thread_num(), int(scratch.size()) - 1);
        if (!scratch[tid]) {
          scratch[tid] = std::make_unique<Scratch<acc_t>>(s.slots(), s.dim);
          rows[tid] = std::make_unique<RowWindow[]>(kPieceRows);
        }
        if (avx2 && backward_fast(P, A, *scratch[tid], rows[tid].get(), task, bh, t, h, nh, w0,
                                  w1, wstep))
          return;
        fused_backward_row<GenericOps<scalar_t>, scalar_t>(P, A, *scratch[tid], rows[tid].get(),
                                                           task, bh, t, h, nh, w0, w1, wstep);
      });
      if (s.has_rpb) reduce_bias(s, g, dbias, drpb_acc.data_ptr<acc_t>());
      // Every key lies in its own query's window, so every flag is set by now; a key that
      // no window reached would get zero gradients.
      for (int64_t tok = 0; tok < int64_t(seen.size()); ++tok)
        if (!seen[tok]) {
          std::fill_n(A.dk + tok * s.dim, s.dim, acc_t(0));
          std::fill_n(A.dv + tok * s.dim, s.dim, acc_t(0));
        }
    }
    dk = dk_acc.scalar_type() == key.scalar_type() ? dk_acc : dk_acc.to(key.scalar_type());
    dv = dv_acc.scalar_type() == value.scalar_type() ? dv_acc : dv_acc.to(value.scalar_type());
    if (s.has_rpb)
      drpb = drpb_acc.scalar_type() == rpb.scalar_type() ? drpb_acc
                                                          : drpb_acc.to(rpb.scalar_type());
  });
  c10::optional<at::Tensor> grad_rpb;
  if (s.has_rpb) grad_rpb = drpb;
  return {dq, dk, dv, grad_rpb};
}

// ------------------------------------------------------------------------------------------
// Unfused 2-D ops (generic loops; they serve attention maps and NATTEN<=0.17-style code).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename Fn>
void for_each_query(const Problem<scalar_t>& P, const Fn& fn) {
  const Shape3d& s = P.s;
  const int64_t rows = s.batch * s.heads * s.size[0] * s.size[1];
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    using acc_t = typename AccOf<scalar_t>::type;
    Scratch<acc_t> sc(s.slots(), s.dim);
    RowWindow rw;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / (s.size[0] * s.size[1]);
      const int64_t th = row % (s.size[0] * s.size[1]);
      const int64_t t = th / s.size[1], h = th % s.size[1];
      build_row(P, t, h, rw);
      for (int64_t w = 0; w < s.size[2]; ++w) {
        const int n = build_slots(P, rw, w, sc.off.data(), sc.bias.data(), sc.slot.data());
        fn(sc, bh, row * s.size[2] + w, n);
      }
    }
  });
}

at::Tensor qk_forward(const at::Tensor& query, const at::Tensor& key,
                      const c10::optional<at::Tensor>& rpb_opt, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk";
  const bool has_rpb = rpb_opt.has_value() && rpb_opt->defined();
  const Shape3d s = check_config(query, op, "query", 2, kernel_size, dilation, is_causal,
                                 has_rpb);
  check_like(query, key, op, "query", "key");
  if (has_rpb) check_rpb(*rpb_opt, query, s, 2, op);
  std::vector<int64_t> shape(query.sizes().begin(), query.sizes().end() - 1);
  shape.push_back(s.slots());
  at::Tensor attn = at::empty(shape, query.options());
  if (attn.numel() == 0) return attn;
  const at::Tensor rpb = has_rpb ? *rpb_opt : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const auto P = make_problem<scalar_t>(s, 1.0, rpb);
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* k = key.data_ptr<scalar_t>();
    scalar_t* a = attn.data_ptr<scalar_t>();
    const int64_t bh_stride = s.tokens() * s.dim;
    const int64_t K = s.slots();
    for_each_query(P, [&](Scratch<acc_t>& sc, int64_t bh, int64_t tok, int n) {
      for (int d = 0; d < s.dim; ++d) sc.q[d] = static_cast<acc_t>(q[tok * s.dim + d]);
      GenericOps<scalar_t>::dots(sc.q.data(), k + bh * bh_stride, sc.off.data(), n,
                                 int(s.dim), sc.a.data());
      scalar_t* ai = a + tok * K;
      for (int64_t j = 0; j < K; ++j) ai[j] = -std::numeric_limits<scalar_t>::infinity();
      const scalar_t* rb = P.rpb ? P.rpb + (bh % s.heads) * s.bias_size() : nullptr;
      for (int j = 0; j < n; ++j) {
        acc_t v = sc.a[j];
        if (rb) v += static_cast<acc_t>(rb[sc.bias[j]]);
        ai[sc.slot[j]] = static_cast<scalar_t>(v);
      }
    });
  });
  return attn;
}

at::Tensor av_forward(const at::Tensor& attn, const at::Tensor& value,
                      at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                      const c10::List<bool>& is_causal) {
  const char* op = "na2d_av";
  const Shape3d s = check_config(value, op, "value", 2, kernel_size, dilation, is_causal,
                                 false);
  check_attn(op, attn, value, s);
  at::Tensor out = at::empty_like(value);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "na_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const auto P = make_problem<scalar_t>(s, 1.0, at::Tensor());
    const scalar_t* a = attn.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t bh_stride = s.tokens() * s.dim;
    const int64_t K = s.slots();
    for_each_query(P, [&](Scratch<acc_t>& sc, int64_t bh, int64_t tok, int n) {
      for (int j = 0; j < n; ++j) sc.a[j] = static_cast<acc_t>(a[tok * K + sc.slot[j]]);
      std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
      GenericOps<scalar_t>::weighted_sum(sc.a.data(), v + bh * bh_stride, sc.off.data(), n,
                                         int(s.dim), sc.acc.data());
      for (int d = 0; d < s.dim; ++d) o[tok * s.dim + d] = static_cast<scalar_t>(sc.acc[d]);
    });
  });
  return out;
}

// Phased scatter over queries for the unfused backwards.
template <typename scalar_t, typename Fn>
void for_each_query_phased(const Problem<scalar_t>& P, const TaskGrid& g, const Fn& fn) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Shape3d& s = P.s;
  std::vector<std::unique_ptr<Scratch<acc_t>>> scratch(at::get_num_threads() + 1);
  std::vector<std::unique_ptr<RowWindow>> rows(at::get_num_threads() + 1);
  run_phased(s, g, 1, [&](int64_t task, int64_t bh, int64_t t, int64_t h, int,
                              int64_t w0, int64_t w1, int64_t wstep) {
    const int tid = std::min<int>(at::get_thread_num(), int(scratch.size()) - 1);
    if (!scratch[tid]) {
      scratch[tid] = std::make_unique<Scratch<acc_t>>(s.slots(), s.dim);
      rows[tid] = std::make_unique<RowWindow>();
    }
    Scratch<acc_t>& sc = *scratch[tid];
    build_row(P, t, h, *rows[tid]);
    for (int64_t w = w0; w < w1; w += wstep) {
      const int n = build_slots(P, *rows[tid], w, sc.off.data(), sc.bias.data(),
                                sc.slot.data());
      fn(sc, task, bh, (bh * s.size[0] * s.size[1] + t * s.size[1] + h) * s.size[2] + w, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qk_backward(
    const at::Tensor& grad_attn, const at::Tensor& query, const at::Tensor& key, bool has_rpb,
    at::IntArrayRef kernel_size, at::IntArrayRef dilation, const c10::List<bool>& is_causal) {
  const char* op = "na2d_qk_backward";
  const Shape3d s = check_config(query, op, "query", 2, kernel_size, dilation, is_causal,
                                 has_rpb);
  check_like(query, key, op, "query", "key");
  check_attn(op, grad_attn, query, s);
  at::Tensor dq = at::empty_like(query);
  at::Tensor dk, drpb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "na_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    at::Tensor dk_acc = accumulation_buffer<acc_t>(key);
    at::Tensor drpb_acc;
    if (has_rpb)
      drpb_acc = at::zeros({s.heads, s.bias_extent(1), s.bias_extent(2)},
                           dk_acc.options());
    if (query.numel() > 0) {
      const auto P = make_problem<scalar_t>(s, 1.0, at::Tensor());
      const TaskGrid g = make_grid(s);
      std::vector<acc_t> dbias;
      if (has_rpb) dbias.assign(s.batch * s.heads * g.per_bh() * s.bias_size(), acc_t(0));
      const scalar_t* ga = grad_attn.data_ptr<scalar_t>();
      const scalar_t* q = query.data_ptr<scalar_t>();
      const scalar_t* k = key.data_ptr<scalar_t>();
      scalar_t* dqp = dq.data_ptr<scalar_t>();
      acc_t* dkp = dk_acc.data_ptr<acc_t>();
      const int64_t bh_stride = s.tokens() * s.dim;
      const int64_t K = s.slots();
      const int dim = int(s.dim);
      for_each_query_phased(P, g, [&](Scratch<acc_t>& sc, int64_t task, int64_t bh,
                                      int64_t tok, int n) {
        for (int j = 0; j < n; ++j) sc.a[j] = static_cast<acc_t>(ga[tok * K + sc.slot[j]]);
        for (int d = 0; d < dim; ++d) sc.q[d] = static_cast<acc_t>(q[tok * s.dim + d]);
        std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
        GenericOps<scalar_t>::weighted_sum(sc.a.data(), k + bh * bh_stride, sc.off.data(), n,
                                           dim, sc.acc.data());
        for (int d = 0; d < dim; ++d) dqp[tok * s.dim + d] = static_cast<scalar_t>(sc.acc[d]);
        acc_t* dkb = dkp + bh * bh_stride;
        for (int j = 0; j < n; ++j)
          GenericOps<scalar_t>::axpy(sc.a[j], sc.q.data(), dkb + sc.off[j], dim);
        if (has_rpb) {
          acc_t* db = dbias.data() + task * s.bias_size();
          for (int j = 0; j < n; ++j) db[sc.bias[j]] += sc.a[j];
        }
      });
      if (has_rpb) reduce_bias(s, g, dbias, drpb_acc.data_ptr<acc_t>());
    }
    dk = dk_acc.scalar_type() == key.scalar_type() ? dk_acc : dk_acc.to(key.scalar_type());
    if (has_rpb) drpb = drpb_acc.to(query.scalar_type());
  });
  c10::optional<at::Tensor> grad_rpb;
  if (has_rpb) grad_rpb = drpb;
  return {dq, dk, grad_rpb};
}

std::tuple<at::Tensor, at::Tensor> av_backward(const at::Tensor& grad_out,
                                               const at::Tensor& attn, const at::Tensor& value,
                                               at::IntArrayRef kernel_size,
                                               at::IntArrayRef dilation,
                                               const c10::List<bool>& is_causal) {
  const char* op = "na2d_av_backward";
  const Shape3d s = check_config(value, op, "value", 2, kernel_size, dilation, is_causal,
                                 false);
  check_attn(op, attn, value, s);
  check_like(value, grad_out, op, "value", "grad_out");
  at::Tensor dattn = at::zeros_like(attn);
  at::Tensor dv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "na_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    at::Tensor dv_acc = accumulation_buffer<acc_t>(value);
    if (value.numel() > 0) {
      const auto P = make_problem<scalar_t>(s, 1.0, at::Tensor());
      const TaskGrid g = make_grid(s);
      const scalar_t* go = grad_out.data_ptr<scalar_t>();
      const scalar_t* a = attn.data_ptr<scalar_t>();
      const scalar_t* v = value.data_ptr<scalar_t>();
      scalar_t* da = dattn.data_ptr<scalar_t>();
      acc_t* dvp = dv_acc.data_ptr<acc_t>();
      const int64_t bh_stride = s.tokens() * s.dim;
      const int64_t K = s.slots();
      const int dim = int(s.dim);
      for_each_query_phased(P, g, [&](Scratch<acc_t>& sc, int64_t task, int64_t bh,
                                      int64_t tok, int n) {
        for (int d = 0; d < dim; ++d) sc.q[d] = static_cast<acc_t>(go[tok * s.dim + d]);
        GenericOps<scalar_t>::dots(sc.q.data(), v + bh * bh_stride, sc.off.data(), n, dim,
                                   sc.b.data());
        for (int j = 0; j < n; ++j) {
          da[tok * K + sc.slot[j]] = static_cast<scalar_t>(sc.b[j]);
          GenericOps<scalar_t>::axpy(static_cast<acc_t>(a[tok * K + sc.slot[j]]), sc.q.data(),
                                     dvp + bh * bh_stride + sc.off[j], dim);
        }
      });
    }
    dv = dv_acc.scalar_type() == value.scalar_type() ? dv_acc : dv_acc.to(value.scalar_type());
  });
  return {dattn, dv};
}

// ------------------------------------------------------------------------------------------
// Registration.
// ------------------------------------------------------------------------------------------
template <int ND>
std::tuple<at::Tensor, at::Tensor> forward_nd(const at::Tensor& query, const at::Tensor& key,
                                              const at::Tensor& value,
                                              const c10::optional<at::Tensor>& rpb,
                                              at::IntArrayRef kernel_size,
                                              at::IntArrayRef dilation,
                                              const c10::List<bool>& is_causal, double scale) {
  return fused_forward(ND, query, key, value, rpb, kernel_size, dilation, is_causal, scale);
}

template <int ND>
std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> backward_nd(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& logsumexp, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    const c10::List<bool>& is_causal, double scale) {
  return fused_backward(ND, grad_out, query, key, value, rpb, out, logsumexp, kernel_size,
                        dilation, is_causal, scale);
}

}  // namespace
}  // namespace na
}  // namespace mmboat

TORCH_LIBRARY_IMPL(mmboat, CPU, m) {
  using namespace mmboat::na;
  m.impl("na1d_forward", &forward_nd<1>);
  m.impl("na2d_forward", &forward_nd<2>);
  m.impl("na3d_forward", &forward_nd<3>);
  m.impl("na1d_backward", &backward_nd<1>);
  m.impl("na2d_backward", &backward_nd<2>);
  m.impl("na3d_backward", &backward_nd<3>);
  m.impl("na2d_qk", &qk_forward);
  m.impl("na2d_qk_backward", &qk_backward);
  m.impl("na2d_av", &av_forward);
  m.impl("na2d_av_backward", &av_backward);
}
