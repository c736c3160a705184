// What the plain and the window decode steps share: the feature rows of one token and the sweep
// over a head's state that updates it and reads it in one pass.

#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace sata {

// phi(x) built degree by degree: the degree-p monomials whose largest index is j are the first
// C(j+p-1, p-1) degree-(p-1) monomials (a contiguous prefix) times x_j, each with its step weight.
// Whole vectors are written: a segment's overhang lands where the next segment (or the padding
// after D) is written afterwards, so no lane is ever masked. Rows need D + W entries.
template <typename T>
struct Features {
  int64_t d, P;
  const int64_t* prefix_len;
  const T* weight;

  // degree 0 and 1; x == nullptr stands for a zero input (a masked key: its NaNs must not be read)
  void degree01(const T* x, T s, T* phi) const {
    phi[0] = T(1);
    for (int64_t j = 0; j < d && P > 1; ++j) phi[1 + j] = x == nullptr ? T(0) : x[j] * s;
  }

  // degree p (>= 2) of one row, from its degree p - 1 block at prev; returns the block's size
  int64_t degree(T* phi, const T* prev, T* out, const T* w, int64_t p) const {
    // half vectors: feature segments are short (C(j+p-1, p-1) entries), so narrower vectors waste
    // fewer lanes and split fewer cache lines
    using V = Vec<T, NARROW>;
    const T* xs = phi + 1;
    T* start = out;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t len = prefix_len[(p - 2) * d + j];
      const T xj = xs[j];
      for (int64_t i = 0; i < len; i += V::W) V::store(out + i, V::load(prev + i) * V::load(w + i) * xj);
      out += len;
      w += len;
    }
    return out - start;
  }

  // all degrees of `rows` rows (stride ld), one degree at a time across the rows, so a row's
  // fresh stores have retired before its next degree reads them
  void build(T* phi, int64_t rows, int64_t ld) const {
    int64_t prev = 1, cur = 1 + d, wo = 0;
    for (int64_t p = 2; p < P; ++p) {
      int64_t size = 0;
      for (int64_t r = 0; r < rows; ++r) size = degree(phi + r * ld, phi + r * ld + prev, phi + r * ld + cur, weight + wo, p);
      prev = cur;
      cur += size;
      wo += size;
    }
  }
};

// a vector of TS from Vec<TS>::W entries of T at p: one load when they are the same type, else a
// narrower load widened lane-wise in registers (a lane-by-lane copy compiles to masked broadcasts)
template <typename T, typename TS>
inline typename Vec<TS>::type widen(const T* p) {
  if constexpr (sizeof(T) == sizeof(TS)) {
    return Vec<TS>::load(reinterpret_cast<const TS*>(p));
  } else {
    typedef T N __attribute__((vector_size(Vec<TS>::W * sizeof(T))));
    N x;
    std::memcpy(&x, p, sizeof(x));
    return __builtin_convertvector(x, typename Vec<TS>::type);
  }
}

// the first n < Vec<TS>::W lanes of p (the rest 0), and their store: masked moves where the target
// has them (a row's tail may end the buffer), else lane by lane
template <typename TS>
inline typename Vec<TS>::type load_first(const TS* p, int64_t n) {
  typename Vec<TS>::type x{};
#if defined(__AVX512F__)
  if constexpr (sizeof(TS) == 4 && Vec<TS>::W == 16) {
    const __m512 r = _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
    std::memcpy(&x, &r, sizeof(x));
    return x;
  } else if constexpr (sizeof(TS) == 8 && Vec<TS>::W == 8) {
    const __m512d r = _mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p);
    std::memcpy(&x, &r, sizeof(x));
    return x;
  }
#endif
  for (int64_t l = 0; l < n; ++l) x[l] = p[l];
  return x;
}

template <typename TS>
inline void store_first(TS* p, typename Vec<TS>::type x, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(TS) == 4 && Vec<TS>::W == 16) {
    __m512 r;
    std::memcpy(&r, &x, sizeof(r));
    _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), r);
    return;
  } else if constexpr (sizeof(TS) == 8 && Vec<TS>::W == 8) {
    __m512d r;
    std::memcpy(&r, &x, sizeof(r));
    _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), r);
    return;
  }
#endif
  for (int64_t l = 0; l < n; ++l) p[l] = x[l];
}

// widen() of the first n < Vec<TS>::W entries, the rest 0 (a feature row's padding may hold anything)
template <typename T, typename TS>
inline typename Vec<TS>::type widen_first(const T* p, int64_t n) {
  if constexpr (sizeof(T) == sizeof(TS)) {
    return load_first<TS>(reinterpret_cast<const TS*>(p), n);
  } else {
    typename Vec<TS>::type x{};
    for (int64_t l = 0; l < n; ++l) x[l] = TS(p[l]);
    return x;
  }
}

// One head with one query head and F = Ev + 1 known at compile time: a single sweep over the
// feature index updates all F state rows and accumulates all F read-outs in registers. The feature
// rows pk, pq are read up to D only.
template <typename T, typename TS, int F>
inline void sweep_fixed(const TS* src, TS* dst, int64_t D, const T* pk, const T* pq, const T* vt, TS* u) {
  using V = Vec<TS>;
  using VT = typename V::type;
  VT acc[F], vf[F];
  for (int f = 0; f < F; ++f) {
    acc[f] = VT{};
    vf[f] = VT{} + TS(vt[f]);
  }
  int64_t i = 0;
  for (; i + V::W <= D; i += V::W) {
    const VT p = widen<T, TS>(pk + i), q = widen<T, TS>(pq + i);
#pragma GCC unroll 17
    for (int f = 0; f < F; ++f) {
      const VT s = V::load(src + f * D + i) + vf[f] * p;
      V::store(dst + f * D + i, s);
      acc[f] += q * s;
    }
  }
  if (const int64_t n = D - i; n > 0) {  // the last n < W features: lanes past D are 0 and not stored
    const VT p = widen_first<T, TS>(pk + i, n), q = widen_first<T, TS>(pq + i, n);
#pragma GCC unroll 17
    for (int f = 0; f < F; ++f) {
      const VT s = load_first<TS>(src + f * D + i, n) + vf[f] * p;
      store_first<TS>(dst + f * D + i, s, n);
      acc[f] += q * s;
    }
  }
  for (int f = 0; f < F; ++f) u[f] = lanes_sum<TS>(acc[f]);
}

// Any G and F: update every row, then read it once per query head.
template <typename T, typename TS>
inline void sweep_rows(const TS* src, TS* dst, int64_t D, int64_t F, int64_t G, const T* pk, const T* pq,
                       int64_t ldq, const T* vt, TS* u) {
  for (int64_t f = 0; f < F; ++f) {
    const TS vf = TS(vt[f]);
    const TS* s_in = src + f * D;
    TS* s_out = dst + f * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) s_out[i] = s_in[i] + vf * TS(pk[i]);
    for (int64_t g = 0; g < G; ++g) {
      const T* q = pq + g * ldq;
      TS acc = TS(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < D; ++i) acc += TS(q[i]) * s_out[i];
      u[g * F + f] = acc;
    }
  }
}

// S_out = S_in + phi(k) vt^T and u[g, f] = <pq_g, S_out[f, :]> for one head: the fixed sweep for
// the common single-query shapes, the row sweep otherwise
template <typename T, typename TS>
inline void sweep(const TS* src, TS* dst, int64_t D, int64_t F, int64_t G, const T* pk, const T* pq, int64_t ldq,
                  const T* vt, TS* u) {
  if (G == 1 && F == 5) {
    sweep_fixed<T, TS, 5>(src, dst, D, pk, pq, vt, u);
  } else if (G == 1 && F == 9) {
    sweep_fixed<T, TS, 9>(src, dst, D, pk, pq, vt, u);
  } else if (G == 1 && F == 17) {
    sweep_fixed<T, TS, 17>(src, dst, D, pk, pq, vt, u);
  } else {
    sweep_rows<T, TS>(src, dst, D, F, G, pk, pq, ldq, vt, u);
  }
}

// the buffers one thread reuses for its groups of heads: feature rows (ld entries each: D and a
// vector of padding), v~ and the read-outs u [G, F]; uninitialised on purpose (every entry the
// sweeps read is written first, no memset per step)
template <typename T, typename TS>
struct HeadBuffers {
  static constexpr int64_t kHeads = 8;  // heads per group handed to a thread
  int64_t ld;
  std::unique_ptr<T[]> phi;             // [kHeads, 1 + G, ld]: per head its key row, then its G query rows
  std::vector<T> vt;                    // [F]
  std::vector<TS> u;                    // [G, F]
  HeadBuffers(int64_t D, int64_t G, int64_t F)
      : ld(D + Vec<T>::W), phi(new T[kHeads * (1 + G) * (D + Vec<T>::W)]), vt(F), u(G * F) {}
};

// a thread's buffers of type B for one configuration (its sizes in key), kept for the next call: a
// decode loop allocates nothing per step; made anew when the configuration changes
template <typename B, typename... A>
inline B& reused(const std::array<int64_t, 6>& key, const A&... args) {
  thread_local std::unique_ptr<B> buf;
  thread_local std::array<int64_t, 6> made{};
  if (!buf || made != key) {
    buf.reset();
    buf = std::make_unique<B>(args...);
    made = key;
  }
  return *buf;
}

// heads 0 .. N-1 in groups of B::kHeads, handed out as threads ask for them (a thread the scheduler
// delays takes fewer, instead of the call waiting for its fixed share): body(buffers, n0, n1) with
// each thread's own buffers = make()
template <typename Make, typename Body>
inline void share_heads(int64_t N, int64_t per_group, double flops, double work_per_thread, const Make& make,
                        const Body& body) {
  const int64_t groups = (N + per_group - 1) / per_group;
  std::atomic<int64_t> next{0};
  on_threads(threads_for(groups, flops, work_per_thread), [&] {
    auto&& buffers = make();  // a reference to reused() buffers, or a value
    for (int64_t group = next++; group < groups; group = next++)
      body(buffers, group * per_group, std::min(N, (group + 1) * per_group));
  });
}

}  // namespace sata
