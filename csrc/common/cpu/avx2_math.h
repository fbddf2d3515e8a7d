// AVX2 targeting and math shared by the CPU kernels of csrc/common/cpu/ (torch-free).
//
// The build targets baseline x86-64, so the extension loads on any x86-64 CPU; AVX2 code is
// compiled in functions that carry a target attribute and runs only where cpu_has_avx2() says
// so. That is the one targeting mechanism of the CPU kernels:
//  * MMBOAT_AVX2 (AVX2 + FMA) marks the hand-written intrinsic kernels and the MMBOAT_FLATTEN
//    instances that inline a generic template around them (e.g. the NA fused loops over
//    Avx2Ops).
//  * MMBOAT_AVX2_VEC (AVX2 without FMA) marks the AVX2 instances of generic loops that the
//    compiler vectorises (the FSLA generic split and leaf loops). Without FMA the compiler cannot
//    contract a * b + c, and without -ffast-math it vectorises only element-wise work (no
//    reordered sums), so such an instance rounds exactly as its baseline instance does.
// The caller picks an instance per call (avx2_or, generic_instance), never per element.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MMBOAT_X86 1
#include <immintrin.h>
#define MMBOAT_AVX2 __attribute__((target("avx2,fma")))
#define MMBOAT_AVX2_VEC __attribute__((target("avx2")))
#else
#define MMBOAT_X86 0
#define MMBOAT_AVX2_VEC
#endif

#if defined(__GNUC__)
#define MMBOAT_INLINE inline __attribute__((always_inline))
#define MMBOAT_FLATTEN __attribute__((flatten))
#else
#define MMBOAT_INLINE inline
#define MMBOAT_FLATTEN
#endif

namespace mmboat {
namespace simd {

#if MMBOAT_X86
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
inline bool cpu_has_avx2() { return false; }
#endif

// `avx2` where the CPU runs AVX2 code (and it is given), else `baseline`: how callers choose
// between the two instances of a kernel.
template <typename Fn>
Fn avx2_or(Fn baseline, Fn avx2) {
  return avx2 != nullptr && cpu_has_avx2() ? avx2 : baseline;
}

// The two instances of a generic kernel F (a function written for the compiler to vectorise,
// MMBOAT_INLINE): for the baseline ISA and for AVX2 without FMA (MMBOAT_AVX2_VEC), each with F
// inlined. generic_instance<F>() is the one this CPU runs, a pointer of F's type.
template <auto F, typename... Args>
void run_baseline(Args... args) {
  F(args...);
}
template <auto F, typename... Args>
MMBOAT_AVX2_VEC void run_avx2_vec(Args... args) {
  F(args...);
}
template <auto F>
decltype(F) generic_instance() {
  return avx2_or<decltype(F)>(&run_baseline<F>, &run_avx2_vec<F>);
}

// AVX2 kernels specialised on the head dim are templates on NC = d / 8 (registers hold a row);
// MMBOAT_NC_TABLE lists the instances for NC = 1..8 and pick_avx2 returns the one for head dim
// d, or nullptr where they do not apply (d not a multiple of 8 up to 64, or no AVX2 + FMA).
#define MMBOAT_NC_TABLE(kernel) \
  { kernel<1>, kernel<2>, kernel<3>, kernel<4>, kernel<5>, kernel<6>, kernel<7>, kernel<8> }

template <typename Fn>
Fn pick_avx2(int64_t d, const Fn (&table)[8]) {
  if (d <= 0 || d % 8 != 0 || d > 64 || !cpu_has_avx2()) return nullptr;
  return table[d / 8 - 1];
}

#if MMBOAT_X86
// Lane j of the result is the sum of the 8 lanes of aj.
MMBOAT_AVX2 inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4,
                                __m256 a5, __m256 a6, __m256 a7) {
  const __m256 t0 = _mm256_hadd_ps(a0, a1);
  const __m256 t1 = _mm256_hadd_ps(a2, a3);
  const __m256 t2 = _mm256_hadd_ps(a4, a5);
  const __m256 t3 = _mm256_hadd_ps(a6, a7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Sum of the 8 lanes.
MMBOAT_AVX2 inline float hsum1(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) on 8 lanes, the one AVX2 exp of the CPU kernels (softmax weights of NA and FSLA, the
// FSLA soft assignment): 2^n * p(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2]
// (two-constant reduction, Cephes polynomial, ~2 ulp). Arguments above 88 are clamped to 88,
// below -87 the result is 0 (as is exp(-inf)); NaN stays NaN (the clamps take x as their second
// operand, which max/min return when either is NaN).
MMBOAT_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
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
#endif

}  // namespace simd
}  // namespace mmboat
