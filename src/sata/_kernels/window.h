// What the window-mode kernels (decode_window.cpp, prefill_window.cpp) share: e^x on whole SIMD vectors
// for the softmax of the exact keys, and the far part's centre
// and the coefficients of the series around it (MATH.md section 6).

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

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
  static constexpr int degree = 7, mantissa = 23, bias = 127;
};
template <>
struct ExpConst<double> {
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double log2e = 1.4426950408889634074, lo = -708.3, hi = 709.4;
  static constexpr double magic = 6755399441055744.0;  // 1.5 2^52
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
};

// 1 / k! (a constant where k is)
template <typename T>
constexpr T inverse_factorial(int k) {
  T f = T(1);
  for (int i = 2; i <= k; ++i) f *= T(i);
  return T(1) / f;
}

// 2^n e^r for x = n ln2 + r, |r| <= ln2 / 2, with e^r by its Taylor polynomial (the terms past `degree`
// are below half an ulp): e^x within a few ulps for x in [lo, hi] (NaN for NaN)
template <typename T>
inline typename Vec<T>::type exp_in_range(typename Vec<T>::type x) {
  using C = ExpConst<T>;
  using V = typename Vec<T>::type;
  typedef typename Bits<T>::type I __attribute__((vector_size(sizeof(V))));
  const V magic = V{} + C::magic;
  const V t = x * C::log2e + magic;
  const V n = t - magic;  // x log2e rounded to an integer
  const V r = (x - n * C::ln2_hi) - n * C::ln2_lo;
  V p = V{} + inverse_factorial<T>(C::degree);
#pragma GCC unroll 16
  for (int k = C::degree - 1; k >= 0; --k) p = p * r + inverse_factorial<T>(k);
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
