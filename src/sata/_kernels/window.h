// What the window-mode kernels (decode_window.cpp, prefill_window.cpp) share: e^x on whole SIMD vectors
// for the softmax of the exact keys, and the far part's centre
// and the coefficients of the series around it (MATH.md section 6).

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace sata {

// the constants of vexp: x = n ln2 + r (ln2 = hi + lo, hi with few bits so n hi is exact), |r| <= ln2 / 2
template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f, log2e = 1.44269504088896341f;
  static constexpr float lo = -87.3f, hi = 88.3f;  // 2^n stays a normal number
  static constexpr float magic = 12582912.0f;      // 1.5 2^23: t = x log2e + magic holds n in its low bits
  static constexpr int degree = 6, mantissa = 23, bias = 127;
  // e^r on |r| <= ln2 / 2: the minimax polynomial of degree 6 for the relative error (2.5e-9; Horner in float
  // 1.1e-7, as the Taylor polynomial of degree 7 with one term more)
  static constexpr float coef[degree + 1] = {1.0f, 1.0f, 0.5f, 1.666641533e-1f, 4.166635126e-2f, 8.375125937e-3f,
                                             1.394110848e-3f};
};
template <>
struct ExpConst<double> {
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double log2e = 1.4426950408889634074, lo = -708.3, hi = 709.4;
  static constexpr double magic = 6755399441055744.0;  // 1.5 2^52
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
  static constexpr double coef[degree + 1] = {  // 1 / k!: the Taylor polynomial (the terms past it below half an ulp)
      1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
      1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800};
};

// 2^n e^r for x = n ln2 + r, |r| <= ln2 / 2, with e^r by a polynomial (ExpConst::coef): e^x within a few
// ulps for x in [lo, hi] (NaN for NaN). On AVX-512 n by vrndscale and 2^n by vscalef: 2 instructions for 5
template <typename T>
inline typename Vec<T>::type exp_in_range(typename Vec<T>::type x) {
  using C = ExpConst<T>;
  using V = typename Vec<T>::type;
  const auto series = [](V r) {
    V p = V{} + C::coef[C::degree];
#pragma GCC unroll 16
    for (int k = C::degree - 1; k >= 0; --k) p = p * r + C::coef[k];
    return p;
  };
#if defined(__AVX512F__)
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) {
    const V n = (V)_mm512_roundscale_ps((__m512)(x * C::log2e), nearest);
    return (V)_mm512_scalef_ps((__m512)series((x - n * C::ln2_hi) - n * C::ln2_lo), (__m512)n);
  } else if constexpr (sizeof(V) == 64 && sizeof(T) == 8) {
    const V n = (V)_mm512_roundscale_pd((__m512d)(x * C::log2e), nearest);
    return (V)_mm512_scalef_pd((__m512d)series((x - n * C::ln2_hi) - n * C::ln2_lo), (__m512d)n);
  }
#endif
  typedef typename Bits<T>::type I __attribute__((vector_size(sizeof(V))));
  const V magic = V{} + C::magic;
  const V t = x * C::log2e + magic;
  const V n = t - magic;  // x log2e rounded to an integer
  const V p = series((x - n * C::ln2_hi) - n * C::ln2_lo);
  const I scale = ((I)t - (I)magic + C::bias) << C::mantissa;  // the bits of 2^n
  return p * (V)scale;
}

// e^x lane by lane, within a few ulps: 0 below lo (no subnormal results), inf above hi, NaN for NaN
template <typename T>
inline typename Vec<T>::type vexp(typename Vec<T>::type x) {
  using C = ExpConst<T>;
  using V = typename Vec<T>::type;
  const V lo = V{} + C::lo, hi = V{} + C::hi;
  const V y = exp_in_range<T>(x < lo ? lo : x > hi ? hi : x);
  return x < lo ? V{} : x > hi ? V{} + std::numeric_limits<T>::infinity() : y;
}

// vexp for x <= 0 (scores minus their maximum): without the upper clamp; 0 below lo, NaN for NaN, and
// undefined for x > 0
template <typename T>
inline typename Vec<T>::type vexp_le0(typename Vec<T>::type x) {
  using V = typename Vec<T>::type;
  const V lo = V{} + ExpConst<T>::lo;
  const auto under = x < lo;
  const V y = exp_in_range<T>(under ? lo : x);
  return under ? V{} : y;
}

// c' = mu - alpha sd of the far scores from (N, sum s, sum s^2 / 2); 0 without far keys (sata.hybrid.centre)
template <typename T>
inline T centre(T N, T m1, T m2, T alpha) {
  if (!(N > T(0))) return T(0);
  const T mu = m1 / N;
  if (alpha == T(0)) return mu;
  const T var = T(2) * m2 / N - mu * mu;
  return mu - alpha * (var > T(0) ? std::sqrt(var) : T(0));
}

// a_m(c) = sum_{n < P-m} (-c)^n / n! for m < P (sata.hybrid.centre_coefficients; 1 / n a constant factor)
template <typename T>
inline void coefficients(T c, int64_t P, T* a) {
  T term = T(1), sum = T(0);
  for (int64_t n = 0; n < P; ++n) {
    if (n) term = term * (-c) * (T(1) / T(n));
    sum += term;
    a[P - 1 - n] = sum;
  }
}

}  // namespace sata
