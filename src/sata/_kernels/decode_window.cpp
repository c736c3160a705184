// Fused decode step of the window mode (MATH.md section 6), for the CPU: exact softmax over the
// window and the sinks, the re-centred Taylor far state for the rest, one normaliser.
//
// One token at position p = n_tokens, per key/value head n (batch row b) and its G query heads:
//   1. the key in slot p % W (position p - W) leaves the window; if the slot is flagged it is far
//      for the new query, so phi(k_leave - mu) [v_leave, 1] joins the far state first, in the same
//      sweep that reads it (W = 0: the new key itself, unless it is padded or a sink)
//   2. the new key takes the slot (flag: kept and not a sink) and, while the row has free sinks,
//      the next sink slot too (sink_pos = p)
//   3. per query head: delta = scale q.mu (0 without a key centre); the centre c' of the far
//      scores s' = s - delta, mu' - alpha sd' from the degree 0..2 blocks of the normaliser row
//      (N, sum s', sum s'^2 / 2), or -delta without recentre; the query's feature blocks scaled
//      by a_m(c') = T_{P-m}(-c'), so U = sum_m a_m(c') phi_m(q)^T S_m comes out of one sweep;
//      the exact part over the flagged window slots and the filled sinks; and with c = c' + delta
//      (0 without recentre) and m = max(m_exact, c):
//        y = (e^{m_exact - m} num + beta e^{c - m} U[:Ev]) / (e^{m_exact - m} den + beta e^{c - m} U[Ev])
//      (0 where that normaliser is not positive).
// The flags and sink positions are per batch row: they are updated before the heads run, from the
// flag of the leaving slot read first. The exact part and the centre are computed in the compute
// dtype T as the PyTorch path does; the far state accumulates in its own precision TS.
//
// Layouts: WindowDecodeTensors in kernels.h. Threads as in kernels.h (decode.h: share_heads).

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode.h"
#include "kernels.h"

namespace {

using sata::Features;

// one thread's buffers: the decode step's, and the scaled queries, the absorbed key, the exact
// scores and the per-query centre pieces
template <typename T, typename TS>
struct WindowBuffers : sata::HeadBuffers<T, TS> {
  std::vector<T> qs;     // [kHeads, G, d] scaled queries
  std::vector<T> key;    // [d] the absorbed key, centred
  std::vector<T> score;  // [W + S] exact scores of one query
  std::vector<T> num;    // [Ev] exact numerator of one query
  std::vector<T> coef;   // [P] a_m of one query
  std::vector<TS> c;     // [G] the far part's maximum c of each query of a head
  WindowBuffers(const WindowDecodeArgs& w)
      : sata::HeadBuffers<T, TS>(w.base.D, w.base.G, w.base.Ev + 1),
        qs(sata::HeadBuffers<T, TS>::kHeads * w.base.G * w.base.d), key(w.base.d), score(w.W + w.S),
        num(w.base.Ev), coef(w.base.P), c(w.base.G) {}
};

// what the heads of a batch row share this step: whether the key it absorbs is kept (the leaving
// slot's flag, or for W = 0 the new key's) and the sink slot the new key fills (-1: none)
struct Rows {
  std::vector<uint8_t> absorb;
  std::vector<int64_t> sink_slot;
};

// c' = mu - alpha sd of the far scores from (N, sum s, sum s^2 / 2); 0 without far keys (sata.hybrid.centre)
template <typename T>
inline T centre(T N, T m1, T m2, T alpha) {
  if (!(N > T(0))) return T(0);
  const T mu = m1 / N;
  if (alpha == T(0)) return mu;
  const T var = T(2) * m2 / N - mu * mu;
  return mu - alpha * (var > T(0) ? std::sqrt(var) : T(0));
}

// a_m(c) = sum_{n < P-m} (-c)^n / n! for m < P (sata.hybrid.centre_coefficients, same order of operations)
template <typename T>
inline void coefficients(T c, int64_t P, T* a) {
  T term = T(1), sum = T(0);
  for (int64_t n = 0; n < P; ++n) {
    if (n) term = term * (-c) / T(n);
    sum += term;
    a[P - 1 - n] = sum;
  }
}

// scale * q.k of the scaled query x against a stored key, in T (keys scaled as the PyTorch path does)
template <typename T, typename TS>
inline T score(const T* x, const TS* key, int64_t d, T sk) {
  T s = T(0);
  for (int64_t j = 0; j < d; ++j) s += x[j] * (T(key[j]) * sk);
  return s;
}

// heads n0 .. n1-1 of a window decode step, in one thread's buffers; off [P + 1] the degree offsets
template <typename T, typename TS>
void window_heads(const WindowDecodeArgs& w, const WindowDecodeTensors& t, const Rows& rows, const int64_t* off,
                  int64_t n0, int64_t n1, WindowBuffers<T, TS>& buf) {
  const DecodeArgs& a = w.base;
  const int64_t G = a.G, d = a.d, Ev = a.Ev, D = a.D, F = Ev + 1, P = a.P, W = w.W, S = w.S, ld = buf.ld;
  const int64_t slot = W ? t.n_tokens % W : 0, Dm = off[P < 3 ? P : 3];
  const T sq = T(a.sq), sk = T(a.sk);
  const T *q = static_cast<const T*>(t.q), *k = static_cast<const T*>(t.k), *v = static_cast<const T*>(t.v);
  const T *alpha = static_cast<const T*>(t.alpha), *beta = static_cast<const T*>(t.beta);
  const TS* mu = static_cast<const TS*>(t.key_centre);
  TS *win_k = static_cast<TS*>(t.win_k), *win_v = static_cast<TS*>(t.win_v);
  TS *sink_k = static_cast<TS*>(t.sink_k), *sink_v = static_cast<TS*>(t.sink_v);
  T* y = static_cast<T*>(t.y);
  T* phi = buf.phi.get();
  const Features<T> feat{d, P, a.prefix_len, static_cast<const T*>(a.weight)};
  const bool scaled = w.recentre || mu != nullptr;  // else every a_m is 1

  // feature rows: per head the absorbed key (centred, then scaled), then its scaled queries
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = n / w.Hkv;
    T* base = phi + (n - n0) * (1 + G) * ld;
    if (rows.absorb[b]) {
      for (int64_t j = 0; j < d; ++j) {
        const T x = W ? T(win_k[(n * W + slot) * d + j]) : k[n * d + j];
        buf.key[j] = mu ? x - T(mu[n * d + j]) : x;
      }
      feat.degree01(buf.key.data(), sk, base);
    } else {
      feat.degree01(nullptr, sk, base);  // a padded key's NaNs must not be read
    }
    for (int64_t g = 0; g < G; ++g) {
      T* x = buf.qs.data() + ((n - n0) * G + g) * d;
      for (int64_t j = 0; j < d; ++j) x[j] = q[(n * G + g) * d + j] * sq;
      feat.degree01(x, T(1), base + (1 + g) * ld);
    }
  }
  feat.build(phi, (n1 - n0) * (1 + G), ld);

  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = n / w.Hkv, h0 = (n % w.Hkv) * G;
    const T* pk = phi + (n - n0) * (1 + G) * ld;
    T* pq = phi + (n - n0) * (1 + G) * ld + ld;
    const T* qs = buf.qs.data() + (n - n0) * G * d;
    T* vt = buf.vt.data();
    TS* u = buf.u.data();
    // v~ of the absorbed key, read before the new key takes its slot
    const bool use = rows.absorb[b];
    for (int64_t f = 0; f < Ev; ++f) vt[f] = !use ? T(0) : W ? T(win_v[(n * W + slot) * Ev + f]) : v[n * Ev + f];
    vt[Ev] = use ? T(1) : T(0);
    if (W) {
      for (int64_t j = 0; j < d; ++j) win_k[(n * W + slot) * d + j] = TS(k[n * d + j]);
      for (int64_t f = 0; f < Ev; ++f) win_v[(n * W + slot) * Ev + f] = TS(v[n * Ev + f]);
    }
    if (const int64_t s = rows.sink_slot[b]; s >= 0) {
      for (int64_t j = 0; j < d; ++j) sink_k[(n * S + s) * d + j] = TS(k[n * d + j]);
      for (int64_t f = 0; f < Ev; ++f) sink_v[(n * S + s) * Ev + f] = TS(v[n * Ev + f]);
    }

    // the centre of each query, and its query row scaled per degree by a_m(c')
    const TS* src = static_cast<const TS*>(t.S_in) + n * F * D;
    TS* dst = static_cast<TS*>(t.S_out) + n * F * D;
    const TS* z = src + (F - 1) * D;  // the normaliser row, before this step's key
    const TS vz = TS(vt[Ev]);
    for (int64_t g = 0; g < G; ++g) {
      T* row = pq + g * ld;
      T delta = T(0);
      if (mu)
        for (int64_t j = 0; j < d; ++j) delta += qs[g * d + j] * (T(mu[n * d + j]) * sk);
      T shifted = -delta;
      buf.c[g] = TS(0);
      if (w.recentre) {
        // moments of the far scores over the far keys, this step's included (as the sweep adds it)
        TS m[3] = {z[0] + vz * TS(pk[0]), TS(0), TS(0)};
        for (int64_t i = 1; i < Dm; ++i) m[i < 1 + d ? 1 : 2] += TS(row[i]) * (z[i] + vz * TS(pk[i]));
        shifted = T(centre<TS>(m[0], m[1], m[2], TS(alpha[h0 + g])));
        buf.c[g] = TS(shifted + delta);
      }
      if (scaled) {
        coefficients<T>(shifted, P, buf.coef.data());
        for (int64_t p = 0; p < P; ++p)
          for (int64_t i = off[p]; i < off[p + 1]; ++i) row[i] *= buf.coef[p];
      }
    }
    sata::sweep<T, TS>(src, dst, D, F, G, pk, pq, ld, vt, u);
    const bool has_far = dst[(F - 1) * D] > TS(0);  // far keys counted by the degree-0 normaliser entry

    // the exact part of each query and the shared normaliser
    const uint8_t* flags = t.win_keep + b * W;
    const int64_t* pos = t.sink_pos + b * S;
    for (int64_t g = 0; g < G; ++g) {
      const T* x = qs + g * d;
      T* sc = buf.score.data();
      T m_exact = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < W; ++j)
        if (flags[j]) {
          sc[j] = score<T, TS>(x, win_k + (n * W + j) * d, d, sk);
          m_exact = sc[j] > m_exact ? sc[j] : m_exact;
        }
      for (int64_t j = 0; j < S; ++j)
        if (pos[j] >= 0) {
          sc[W + j] = score<T, TS>(x, sink_k + (n * S + j) * d, d, sk);
          m_exact = sc[W + j] > m_exact ? sc[W + j] : m_exact;
        }
      const T m_safe = std::isfinite(m_exact) ? m_exact : T(0);
      T den_exact = T(0);
      T* num = buf.num.data();
      for (int64_t f = 0; f < Ev; ++f) num[f] = T(0);
      auto add = [&](T s, const TS* val) {
        const T e = std::exp(s - m_safe);
        den_exact += e;
        for (int64_t f = 0; f < Ev; ++f) num[f] += e * T(val[f]);
      };
      for (int64_t j = 0; j < W; ++j)
        if (flags[j]) add(sc[j], win_v + (n * W + j) * Ev);
      for (int64_t j = 0; j < S; ++j)
        if (pos[j] >= 0) add(sc[W + j], sink_v + (n * S + j) * Ev);

      const TS c = buf.c[g];
      TS m = has_far && c > TS(m_exact) ? c : TS(m_exact);
      if (!std::isfinite(m)) m = TS(0);
      const TS e_exact = std::exp(TS(m_exact) - m);  // 0 without exact keys
      const TS e_far = has_far ? TS(beta[h0 + g]) * std::exp(c - m) : TS(0);
      const TS* uf = u + g * F;
      const TS den = e_exact * TS(den_exact) + e_far * uf[Ev];
      T* yg = y + (n * G + g) * Ev;
      for (int64_t f = 0; f < Ev; ++f)
        yg[f] = den <= TS(0) ? T(0) : T((e_exact * TS(num[f]) + e_far * uf[f]) / den);  // NaN propagates
    }
  }
}

template <typename T, typename TS>
void decode_window(const WindowDecodeArgs& w, const WindowDecodeTensors& t) {
  const DecodeArgs& a = w.base;
  const int64_t B = a.N / w.Hkv, W = w.W, S = w.S, d = a.d, P = a.P;
  // feature offsets of the degrees: 0, 1, 1 + d, then the sums of the hierarchy's segments
  std::vector<int64_t> off(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    int64_t size = p == 0 ? 1 : d;
    if (p >= 2) {
      size = 0;
      for (int64_t j = 0; j < d; ++j) size += a.prefix_len[(p - 2) * d + j];
    }
    off[p + 1] = off[p] + size;
  }
  Rows rows{std::vector<uint8_t>(B), std::vector<int64_t>(B)};
  // per batch row, before any head reads them: the leaving slot's flag, then the new token's flag,
  // sink slot and position (sinks fill in order, so the free ones are the last)
  const int64_t slot = W ? t.n_tokens % W : 0;
  for (int64_t b = 0; b < B; ++b) {
    const bool kept = t.keep == nullptr || t.keep[b];
    int64_t filled = 0;
    for (int64_t j = 0; j < S; ++j) filled += t.sink_pos[b * S + j] >= 0;
    const bool sink = kept && filled < S;
    rows.sink_slot[b] = sink ? filled : -1;
    if (sink) t.sink_pos[b * S + filled] = t.n_tokens;
    if (W) {
      rows.absorb[b] = t.win_keep[b * W + slot];
      t.win_keep[b * W + slot] = kept && !sink;
    } else {
      rows.absorb[b] = kept && !sink;
    }
  }
  using Buffers = WindowBuffers<T, TS>;
  const double flops = sata::work(a.N, 1, a.G, a.Ev + 1, a.D) + 2.0 * a.N * a.G * (W + S) * (d + a.Ev);
  sata::share_heads(
      a.N, Buffers::kHeads, flops, a.work_per_thread, [&] { return Buffers(w); },
      [&](Buffers& buf, int64_t n0, int64_t n1) { window_heads<T, TS>(w, t, rows, off.data(), n0, n1, buf); });
}

}  // namespace

extern "C" {

// returns 0, or 1 when the step failed (out of memory): the outputs and the state are then undefined
#define SATA_DECODE_WINDOW(NAME, T, TS)                                                                       \
  int NAME(const WindowDecodeArgs* a, const WindowDecodeTensors* t) {                                       \
    return sata::guarded([&] { decode_window<T, TS>(*a, *t); });                                            \
  }

SATA_DECODE_WINDOW(sata_decode_window_f32, float, float)
SATA_DECODE_WINDOW(sata_decode_window_f32s64, float, double)
SATA_DECODE_WINDOW(sata_decode_window_f64, double, double)

}  // extern "C"
