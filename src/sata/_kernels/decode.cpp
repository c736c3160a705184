// Fused decode step of symmetry-aware Taylor attention, for the CPU.
//
// For every key/value head n (and its G query heads), in one pass over the state:
//   phi(k), phi(q_g)            packed features through the colex hierarchy
//   S'[f, :] = S[f, :] + v~[f] * phi(k)            v~ = [v, 1], zeroed for a masked key
//   u[g, f]  = <phi(q_g), S'[f, :]>
//   y[g, :]  = u[g, :Ev] / u[g, Ev]                (0 where the normaliser is not positive)
// The state is read once and written once (in place when S_out == S_in), which is the
// memory-traffic floor of a decode step. Built on first use by sata._kernels; threads as in kernels.h.
//
// Layouts (all contiguous): q [N, G, d], k [N, d], v [N, Ev], keep [N] or null,
// S_in / S_out [N, F, D] with F = Ev + 1 (the state's kv[..., D, F] stored D-contiguous), in the
// state's precision TS (float, or double for long float32 streams), y [N, G, Ev].
// prefix_len [(P-2) * d] = C(j+p-1, p-1) for p >= 2 and weight [D-1-d, plus VW of padding] (the
// step weights of degrees >= 2, in feature order) describe the colex hierarchy.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"

namespace {

using sata::Vec;

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

// heads n0 .. n1-1 of a decode step; phi holds (n1 - n0) (1 + G) feature rows of ld entries, vt F, u G F
template <typename T, typename TS>
void decode_heads(const DecodeArgs& a, int64_t n0, int64_t n1, const T* q, const T* k, const T* v,
                  const uint8_t* keep, const TS* S_in, TS* S_out, T* y, T* phi, int64_t ld, T* vt, TS* u) {
  const int64_t G = a.G, d = a.d, Ev = a.Ev, D = a.D, F = Ev + 1, rows = (n1 - n0) * (1 + G);
  const Features<T> feat{d, a.P, a.prefix_len, static_cast<const T*>(a.weight)};
  for (int64_t n = n0; n < n1; ++n) {  // per head, its key row then its G query rows
    T* base = phi + (n - n0) * (1 + G) * ld;
    feat.degree01(keep == nullptr || keep[n] ? k + n * d : nullptr, T(a.sk), base);
    for (int64_t g = 0; g < G; ++g) feat.degree01(q + (n * G + g) * d, T(a.sq), base + (1 + g) * ld);
  }
  feat.build(phi, rows, ld);
  for (int64_t n = n0; n < n1; ++n) {
    const T* pk = phi + (n - n0) * (1 + G) * ld;
    const T* pq = pk + ld;
    const bool use = keep == nullptr || keep[n];
    for (int64_t f = 0; f < Ev; ++f) vt[f] = use ? v[n * Ev + f] : T(0);  // masked: v~ = 0, phi(k) finite
    vt[Ev] = use ? T(1) : T(0);
    const TS* src = S_in + n * F * D;
    TS* dst = S_out + n * F * D;
    if (G == 1 && F == 5) {
      sweep_fixed<T, TS, 5>(src, dst, D, pk, pq, vt, u);
    } else if (G == 1 && F == 9) {
      sweep_fixed<T, TS, 9>(src, dst, D, pk, pq, vt, u);
    } else if (G == 1 && F == 17) {
      sweep_fixed<T, TS, 17>(src, dst, D, pk, pq, vt, u);
    } else {
      sweep_rows<T, TS>(src, dst, D, F, G, pk, pq, ld, vt, u);
    }
    for (int64_t g = 0; g < G; ++g) {
      const TS z = u[g * F + Ev];
      T* yg = y + (n * G + g) * Ev;
      for (int64_t f = 0; f < Ev; ++f) yg[f] = z <= TS(0) ? T(0) : T(u[g * F + f] / z);  // NaN propagates
    }
  }
}

template <typename T, typename TS>
void decode(const DecodeArgs& a, const T* q, const T* k, const T* v, const uint8_t* keep, const TS* S_in, TS* S_out,
            T* y) {
  // heads go out in small groups as threads ask for them: a thread the scheduler delays takes
  // fewer, instead of the call waiting for its fixed share
  constexpr int64_t kHeads = 8;
  const int64_t N = a.N, G = a.G, F = a.Ev + 1, groups = (N + kHeads - 1) / kHeads;
  const int64_t ld = a.D + Vec<T>::W;  // feature rows carry a vector of padding
  std::atomic<int64_t> next{0};
  sata::on_threads(sata::threads_for(groups, sata::work(N, 1, G, F, a.D), a.work_per_thread), [&] {
    // uninitialised on purpose: every entry the sweeps read is written first (no memset per step)
    std::unique_ptr<T[]> phi(new T[kHeads * (1 + G) * ld]);
    std::vector<T> vt(F);
    std::vector<TS> u(G * F);
    for (int64_t group = next++; group < groups; group = next++)
      decode_heads<T, TS>(a, group * kHeads, std::min(N, (group + 1) * kHeads), q, k, v, keep, S_in, S_out, y,
                          phi.get(), ld, vt.data(), u.data());
  });
}

}  // namespace

extern "C" {

int64_t sata_kernel_abi() { return SATA_KERNEL_ABI; }

// sizes of the argument structs, which the Python side mirrors (0 decode, 1 prefill, 2 prefill tensors)
int64_t sata_struct_size(int64_t which) {
  const int64_t sizes[] = {sizeof(DecodeArgs), sizeof(PrefillArgs), sizeof(PrefillTensors)};
  return which >= 0 && which < 3 ? sizes[which] : -1;
}

// returns 0, or 1 when the step failed (out of memory): the outputs are then undefined
#define SATA_DECODE(NAME, T, TS)                                                                             \
  int NAME(const DecodeArgs* a, const T* q, const T* k, const T* v, const uint8_t* keep, const TS* S_in,   \
           TS* S_out, T* y) {                                                                                \
    return sata::guarded([&] { decode<T, TS>(*a, q, k, v, keep, S_in, S_out, y); });                        \
  }

SATA_DECODE(sata_decode_f32, float, float)
SATA_DECODE(sata_decode_f32s64, float, double)
SATA_DECODE(sata_decode_f64, double, double)

}  // extern "C"
