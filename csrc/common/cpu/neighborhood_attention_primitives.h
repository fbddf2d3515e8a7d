// Inner primitives of the CPU neighborhood-attention kernels (torch-free; the kernels are in
// neighborhood_attention_kernels.h). Each works on one query's slot list: `base + off[s]` is
// the row (head_dim values) of slot s. Two implementations with one interface, chosen per call
// by the kernels: GenericOps (plain loops, any element type, float32 accumulation, float64 for
// float64) and Avx2Ops (float32 with head_dim % 8 == 0, AVX2 + FMA: 8 slots' dot products
// reduced together, the weighted sum in registers, the polynomial exp of avx2_math.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/avx2_math.h"
#include "kernel_defs.h"

namespace mmboat {
namespace cpu {
namespace na {

template <typename scalar_t>
struct GenericOps {
  using acc_t = typename AccType<scalar_t>::type;

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

  // Four rows (slots) of one slot list and a dot-product accumulator for each.
  struct Rows4 {
    const float *r0, *r1, *r2, *r3;
    __m256 a0, a1, a2, a3;
    MMBOAT_AVX2 MMBOAT_INLINE Rows4(const float* base, const int64_t* off)
        : r0(base + off[0]), r1(base + off[1]), r2(base + off[2]), r3(base + off[3]),
          a0(_mm256_setzero_ps()), a1(_mm256_setzero_ps()), a2(_mm256_setzero_ps()),
          a3(_mm256_setzero_ps()) {}
    // a_i += x[d, d + 8) * r_i[d, d + 8): the four dot products advanced by 8 columns (one
    // load of x for the four).
    MMBOAT_AVX2 MMBOAT_INLINE void fma(const float* x, int d) {
      const __m256 xv = _mm256_loadu_ps(x + d);
      a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r0 + d), a0);
      a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r1 + d), a1);
      a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r2 + d), a2);
      a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r3 + d), a3);
    }
  };

  // Calls f(std::integral_constant<int, dim / 8>()) and returns true for the head dims that
  // have kernel instances of their own (16, 32, 64: the dim loop unrolls into fixed offsets);
  // returns false for the others.
  template <class F>
  MMBOAT_AVX2 static inline bool with_fixed_head_dim(int dim, const F& f) {
    switch (dim) {
      case 16: f(std::integral_constant<int, 2>()); return true;
      case 32: f(std::integral_constant<int, 4>()); return true;
      case 64: f(std::integral_constant<int, 8>()); return true;
      default: return false;
    }
  }

  // GenericOps::dots, 8 slots at a time with one horizontal reduction. NV = dim / 8 when it
  // is a template constant, 0 for any dim (the call with NV = 0 takes the fixed instance when
  // there is one).
  template <int NV = 0>
  MMBOAT_AVX2 static inline void dots(const float* __restrict q, const float* __restrict base,
                                      const int64_t* __restrict off, int n, int dim,
                                      float* __restrict out,
                                      const float* __restrict add = nullptr) {
    if constexpr (NV == 0) {
      if (with_fixed_head_dim(dim, [&](auto nv) MMBOAT_AVX2 {
            dots<decltype(nv)::value>(q, base, off, n, dim, out, add);
          }))
        return;
    }
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
      Rows4 rows(base, off + s);
      for (int v = 0; v < nv; ++v) rows.fma(q, 8 * v);
      const __m256 t0 = _mm256_hadd_ps(rows.a0, rows.a1);
      const __m256 t1 = _mm256_hadd_ps(rows.a2, rows.a3);
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

  // GenericOps::dots2 for 4 slots at a time: the 4 logits and the 4 dO . V sums share one
  // horizontal reduction. NV as for dots.
  template <int NV = 0>
  MMBOAT_AVX2 static inline void dots2(const float* __restrict q, const float* __restrict g,
                                       const float* __restrict kbase,
                                       const float* __restrict vbase,
                                       const int64_t* __restrict off, int n, int dim,
                                       float* __restrict out, float* __restrict out2,
                                       const float* __restrict add) {
    if constexpr (NV == 0) {
      if (with_fixed_head_dim(dim, [&](auto nv) MMBOAT_AVX2 {
            dots2<decltype(nv)::value>(q, g, kbase, vbase, off, n, dim, out, out2, add);
          }))
        return;
    }
    const int nv = NV > 0 ? NV : dim / 8;
    int s = 0;
    for (; s + 4 <= n; s += 4) {
      Rows4 keys(kbase, off + s), values(vbase, off + s);
      for (int v = 0; v < nv; ++v) {
        keys.fma(q, 8 * v);
        values.fma(g, 8 * v);
      }
      const __m256 r = simd::hsum8(keys.a0, keys.a1, keys.a2, keys.a3, values.a0, values.a1,
                                   values.a2, values.a3);
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

  // x[s] = exp(x[s] - shift) for s < n; x has room for n rounded up to a multiple of 8, and
  // the entries from n to there are overwritten.
  MMBOAT_AVX2 static inline void exp_shift(float* __restrict x, int n, float shift) {
    const __m256 sv = _mm256_set1_ps(shift);
    for (int s = 0; s < n; s += 8)
      _mm256_storeu_ps(x + s, simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), sv)));
  }
};

#endif

}  // namespace na
}  // namespace cpu
}  // namespace mmboat
