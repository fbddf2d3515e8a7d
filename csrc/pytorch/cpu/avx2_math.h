// AVX2+FMA helpers shared by the CPU kernels. The build targets baseline x86-64, so every
// function that uses them carries MMBOAT_AVX2 and runs only when cpu_has_avx2() says so.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MMBOAT_X86 1
#include <immintrin.h>
#define MMBOAT_AVX2 __attribute__((target("avx2,fma")))
#else
#define MMBOAT_X86 0
#endif

namespace mmboat {
namespace simd {

#if MMBOAT_X86
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

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
#else
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace simd
}  // namespace mmboat
