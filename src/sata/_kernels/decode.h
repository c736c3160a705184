// What the plain and the window decode steps share: the feature rows of one token and the sweep
// over a head's state that updates it and reads it in one pass.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

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
    using V = Vec<T, 32>;
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

// One head with one query head and F = Ev + 1 known at compile time: a single sweep over the
// feature index updates all F state rows and accumulates all F read-outs in registers.
template <typename T, typename TS, int F>
inline void sweep_fixed(const TS* src, TS* dst, int64_t D, const T* pk, const T* pq, const T* vt, TS* u) {
  using V = Vec<TS>;
  typename V::type acc[F];
  for (int f = 0; f < F; ++f) acc[f] = typename V::type{};
  int64_t i = 0;
  for (; i + V::W <= D; i += V::W) {
    typename V::type p, q;
    for (int w = 0; w < V::W; ++w) {  // widen T -> TS lane by lane (a no-op copy when equal)
      p[w] = TS(pk[i + w]);
      q[w] = TS(pq[i + w]);
    }
#pragma GCC unroll 17
    for (int f = 0; f < F; ++f) {
      const typename V::type s = V::load(src + f * D + i) + TS(vt[f]) * p;
      V::store(dst + f * D + i, s);
      acc[f] += q * s;
    }
  }
  TS tail[F] = {};
  for (; i < D; ++i)
    for (int f = 0; f < F; ++f) {
      const TS s = src[f * D + i] + TS(vt[f] * pk[i]);
      dst[f * D + i] = s;
      tail[f] += TS(pq[i]) * s;
    }
  for (int f = 0; f < F; ++f) {
    TS t = tail[f];
    for (int w = 0; w < V::W; ++w) t += acc[f][w];
    u[f] = t;
  }
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

// heads 0 .. N-1 in groups of B::kHeads, handed out as threads ask for them (a thread the scheduler
// delays takes fewer, instead of the call waiting for its fixed share): body(buffers, n0, n1) with
// each thread's own buffers = make()
template <typename Make, typename Body>
inline void share_heads(int64_t N, int64_t per_group, double flops, double work_per_thread, const Make& make,
                        const Body& body) {
  const int64_t groups = (N + per_group - 1) / per_group;
  std::atomic<int64_t> next{0};
  on_threads(threads_for(groups, flops, work_per_thread), [&] {
    auto buffers = make();
    for (int64_t group = next++; group < groups; group = next++)
      body(buffers, group * per_group, std::min(N, (group + 1) * per_group));
  });
}

}  // namespace sata
