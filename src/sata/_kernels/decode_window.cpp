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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "decode.h"
#include "kernels.h"
#include "window.h"

namespace {

using sata::Bits;
using sata::lane_mask;
using sata::lanes_max;
using sata::lanes_sum;
using sata::Features;
using sata::Vec;
using sata::centre;
using sata::coefficients;
using sata::vexp_le0;

// ---------------------------------------------------------------- vectors of the exact part
// a vector of T loaded from TS (lane by lane when they differ: keys stored in double, computed in float)
template <typename T, typename TS, int Bytes = sata::VBYTES>
inline typename Vec<T, Bytes>::type load_as(const TS* p) {
  typename Vec<T, Bytes>::type x;
  if constexpr (sizeof(T) == sizeof(TS)) {
    std::memcpy(&x, p, sizeof(x));
  } else {
    for (int l = 0; l < Vec<T, Bytes>::W; ++l) x[l] = T(p[l]);
  }
  return x;
}

// load_as() of the first n lanes (the rest 0): the vector that ends a buffer
template <typename T, typename TS, int Bytes = sata::VBYTES>
inline typename Vec<T, Bytes>::type load_as_first(const TS* p, int64_t n) {
  if constexpr (sizeof(T) == sizeof(TS) && Bytes == sata::VBYTES) {
    return sata::load_first<T>(reinterpret_cast<const T*>(p), n);
  } else {
    typename Vec<T, Bytes>::type x{};
    for (int64_t l = 0; l < n; ++l) x[l] = T(p[l]);
    return x;
  }
}

// the lanes of a and b added pairwise: lanes 2l and 2l + 1 of their concatenation go to lane l
template <typename T, int Bytes>
inline typename Vec<T, Bytes>::type pair_sums(typename Vec<T, Bytes>::type a, typename Vec<T, Bytes>::type b) {
  typedef typename Bits<T>::type M __attribute__((vector_size(Bytes)));
  constexpr auto lanes = std::make_integer_sequence<int, Vec<T, Bytes>::W>{};
  constexpr M even = lane_mask<M>([](int l) { return 2 * l; }, lanes);
  constexpr M odd = lane_mask<M>([](int l) { return 2 * l + 1; }, lanes);
  return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

// s[j] = x . K[j] for the `rows` rows of K, with the head size DK known: L = Vec<T>::W rows at a time, as
// nv = min(DK, L) vector products (L / DK rows in each when a row is shorter than a vector, else one
// row summed over its DK / L vectors), reduced by pair sums: each level keeps every row's partial sums
// together and in row order, so after log2(nv) levels one vector holds the L dot products. The last block
// is stored whole (its missing rows 0): s must have room for rows rounded up to whole vectors. A masked
// store there would stall the full-vector loads that read the scores next (no store forwarding).
template <typename T, typename TS, int DK>
inline void dots_fixed(const T* x, const TS* K, int64_t rows, T* s) {
  using VV = Vec<T>;
  using V = typename VV::type;
  constexpr int L = VV::W, nv = DK < L ? DK : L;
  static_assert(DK % L == 0 || L % DK == 0, "a row is whole vectors, or a vector whole rows");
  V xv[DK < L ? 1 : DK / L];  // the query: repeated L / DK times in one vector, or DK / L vectors
  for (int c = 0; c < (DK < L ? 1 : DK / L); ++c)
    for (int l = 0; l < L; ++l) xv[c][l] = x[DK < L ? l % DK : c * L + l];
  // one block of L rows from j on, of which the first n exist (n < L: the last block, read only up to
  // the end of K, the missing rows 0): p[r] products, reduced by pair sums, stored for the n rows
  const auto block = [&](int64_t j, int64_t n) {
    V p[nv];
#pragma GCC unroll 16
    for (int r = 0; r < nv; ++r) {
      if constexpr (DK <= L) {
        const int64_t lanes = n * DK - r * L;  // of this vector, in the n rows
        p[r] = lanes >= L ? load_as<T, TS>(K + j * DK + r * L) * xv[0]
               : lanes > 0 ? load_as_first<T, TS>(K + j * DK + r * L, lanes) * xv[0] : V{};
      } else if (r < n) {
        p[r] = load_as<T, TS>(K + (j + r) * DK) * xv[0];
        for (int c = 1; c < DK / L; ++c) p[r] += load_as<T, TS>(K + (j + r) * DK + c * L) * xv[c];
      } else {
        p[r] = V{};
      }
    }
#pragma GCC unroll 16
    for (int m = nv; m > 1; m /= 2)
#pragma GCC unroll 16
      for (int r = 0; r < m / 2; ++r) p[r] = pair_sums<T, sata::VBYTES>(p[2 * r], p[2 * r + 1]);
    VV::store(s + j, p[0]);
  };
  int64_t j = 0;
  for (; j + L <= rows; j += L) block(j, L);
  if (j < rows) block(j, rows - j);
}

// s[j] = x . K[j] for the `rows` rows of K (head size d): the fixed-size reduction for the head sizes
// it serves (which may write s up to rows rounded up to whole vectors), else row by row
template <typename T, typename TS>
inline void dots(const T* x, const TS* K, int64_t rows, int64_t d, T* s) {
  switch (d) {
    case 4: return dots_fixed<T, TS, 4>(x, K, rows, s);
    case 8: return dots_fixed<T, TS, 8>(x, K, rows, s);
    case 16: return dots_fixed<T, TS, 16>(x, K, rows, s);
    case 32: return dots_fixed<T, TS, 32>(x, K, rows, s);
    case 64: return dots_fixed<T, TS, 64>(x, K, rows, s);
    default:
      for (int64_t j = 0; j < rows; ++j) {
        T t = T(0);
        for (int64_t i = 0; i < d; ++i) t += x[i] * T(K[j * d + i]);
        s[j] = t;
      }
  }
}

// num[f] += sum_j e[j] val[j, f]. With `checked`, only over the rows with e[j] != 0: a row out of the
// window has e = 0 and may hold NaN, which 0 * NaN would let through; without, every row is in. Four
// accumulators per vector of columns: the adds of consecutive rows do not wait on each other.
template <bool checked, typename T, typename TS>
inline void weighted_rows(const T* e, const TS* val, int64_t rows, int64_t Ev, T* num) {
  using V = typename Vec<T, sata::NARROW>::type;
  constexpr int R = Vec<T, sata::NARROW>::W;
  int64_t f = 0;
  for (; f + R <= Ev; f += R) {
    V a[4] = {V{}, V{}, V{}, V{}};
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4)
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r)
        if (!checked || e[j + r] != T(0)) a[r] += e[j + r] * load_as<T, TS, sata::NARROW>(val + (j + r) * Ev + f);
    for (; j < rows; ++j)
      if (!checked || e[j] != T(0)) a[0] += e[j] * load_as<T, TS, sata::NARROW>(val + j * Ev + f);
    const V sum = (a[0] + a[1]) + (a[2] + a[3]) + load_as<T, T, sata::NARROW>(num + f);
    std::memcpy(num + f, &sum, sizeof(sum));
  }
  for (; f < Ev; ++f) {
    T a = T(0);
    for (int64_t j = 0; j < rows; ++j)
      if (!checked || e[j] != T(0)) a += e[j] * T(val[j * Ev + f]);
    num[f] += a;
  }
}

// Weighted rows when k = L / Ev > 1 rows of values fill one vector (L = Vec<T>::W; short value heads, e.g.
// Ev 8 in float): per chunk of L rows, one vector of weights e, spread to each group of k rows by a constant
// shuffle (lane l of group g takes weight g k + l / Ev), one product per group; the k partial sums of a
// vector fold together at the end. Every row must be in (the unchecked case).
template <typename T, int Ev, int g>
inline void packed_group(typename Vec<T>::type ev, const T* val, int64_t n, typename Vec<T>::type& acc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::W, k = L / Ev;
  typedef typename Bits<T>::type M __attribute__((vector_size(sizeof(V))));
  constexpr M spread = lane_mask<M>([](int l) { return g * k + l / Ev; }, std::make_integer_sequence<int, L>{});
  if (g * k >= n) return;
  const int64_t lanes = std::min<int64_t>(k, n - g * k) * Ev;
  const V vals = lanes == L ? Vec<T>::load(val + g * k * Ev) : sata::load_first<T>(val + g * k * Ev, lanes);
  acc += __builtin_shuffle(ev, spread) * vals;
}

template <typename T, int Ev, int... g>
inline void packed_chunk(typename Vec<T>::type ev, const T* val, int64_t n, typename Vec<T>::type* acc,
                         std::integer_sequence<int, g...>) {
  (packed_group<T, Ev, g>(ev, val, n, acc[g % 4]), ...);
}

template <typename T, int Ev>
inline void weighted_rows_packed(const T* e, const T* val, int64_t rows, T* num) {
  using VV = Vec<T>;
  using V = typename VV::type;
  constexpr int L = VV::W, k = L / Ev;
  V acc[4] = {V{}, V{}, V{}, V{}};
  for (int64_t c = 0; c < rows; c += L) {
    const int64_t n = std::min<int64_t>(L, rows - c);  // a partial last chunk: e and the values read up to its end
    const V ev = n == L ? VV::load(e + c) : sata::load_first<T>(e + c, n);
    packed_chunk<T, Ev>(ev, val + c * Ev, n, acc, std::make_integer_sequence<int, L / k>{});
  }
  V x = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  if constexpr (k >= 2) x += sata::rotate<T, L / 2>(x);
  if constexpr (k >= 4) x += sata::rotate<T, L / 4>(x);
  if constexpr (k >= 8) x += sata::rotate<T, L / 8>(x);
  for (int f = 0; f < Ev; ++f) num[f] += x[f];
}

// num[f] += sum_j e[j] val[j, f] over every row (all in the window): packed for the short value heads
// it serves, else weighted_rows
template <typename T, typename TS>
inline void weighted_all_rows(const T* e, const TS* val, int64_t rows, int64_t Ev, T* num) {
  if constexpr (sizeof(T) == sizeof(TS)) {
    const T* v = reinterpret_cast<const T*>(val);
    switch (Vec<T>::W / Ev * (Vec<T>::W % Ev == 0)) {  // rows per vector (0: not a divisor)
      case 2: return weighted_rows_packed<T, Vec<T>::W / 2>(e, v, rows, num);
      case 4:
        if constexpr (Vec<T>::W >= 4) return weighted_rows_packed<T, Vec<T>::W / 4>(e, v, rows, num);
        break;
      default: break;
    }
  }
  weighted_rows<false, T, TS>(e, val, rows, Ev, num);
}

// x[0 .. n) *= c in whole vectors, the last one masked (a degree's block ends where the next begins)
template <typename T>
inline void scale_range(T* x, int64_t n, T c) {
  using VV = Vec<T>;
  int64_t i = 0;
  for (; i + VV::W <= n; i += VV::W) VV::store(x + i, VV::load(x + i) * c);
  if (i < n) sata::store_first<T>(x + i, sata::load_first<T>(x + i, n - i) * c, n - i);
}

// one thread's buffers: the decode step's, and for the queries of a group of heads their scaled
// vectors, exact scores and sums, and far read-outs
template <typename T, typename TS>
struct WindowBuffers : sata::HeadBuffers<T, TS> {
  static constexpr int64_t kHeads = sata::HeadBuffers<T, TS>::kHeads;
  int64_t Lp;            // W + S rounded up to whole vectors
  std::vector<T> qs;     // [kHeads, G, d] scaled queries
  std::vector<T> qf;     // [kHeads, G, d] the far part's scaled queries (with q_far)
  std::vector<T> key;    // [d] the absorbed key, centred
  std::vector<T> coef;   // [P] a_m of one query
  std::vector<T> e;      // [kHeads, G, Lp] exact scores, then their exponentials (and a vector of room: dots())
  std::vector<T> num;    // [kHeads, G, Ev] exact numerators
  std::vector<T> top;    // [kHeads, G] the largest exact score (-inf: none)
  std::vector<T> den;    // [kHeads, G] exact normalisers
  std::vector<TS> uf;    // [kHeads, G, F] far read-outs
  std::vector<TS> c;     // [kHeads, G] the far part's centre c (its largest weight is e^c)
  std::vector<TS> scale; // [2, kHeads, G] in whole vectors: each part's exponent against the common maximum,
                         // then its e^x (exact part, then far part)
  std::vector<uint8_t> has_far;  // [kHeads] the head has far keys
  std::vector<T> vts;    // [kHeads, F] v~ of each head's absorbed key
  WindowBuffers(const WindowDecodeArgs& w, int64_t Lp)
      : sata::HeadBuffers<T, TS>(w.base.D, w.base.G, w.base.Ev + 1), Lp(Lp), qs(kHeads * w.base.G * w.base.d),
        qf(kHeads * w.base.G * w.base.d),
        key(w.base.d), coef(w.base.P), e(kHeads * w.base.G * Lp + Vec<T>::W), num(kHeads * w.base.G * w.base.Ev),
        top(kHeads * w.base.G), den(kHeads * w.base.G), uf(kHeads * w.base.G * (w.base.Ev + 1)),
        c(kHeads * w.base.G), scale(sata::round_up(2 * kHeads * w.base.G, Vec<TS>::W)), has_far(kHeads),
        vts(kHeads * (w.base.Ev + 1)) {}
};

// what the heads of a batch row share this step: whether the key it absorbs is kept (the leaving
// slot's flag, or for W = 0 the new key's), the sink slot the new key fills (-1: none), and which of
// the W window slots and S sinks its queries attend (all bits set) after the step, padded to whole
// vectors with 0
template <typename T>
struct Rows {
  int64_t Lp = 0;                              // W + S rounded up to whole vectors
  std::vector<uint8_t> absorb;                 // [B]
  std::vector<int64_t> sink_slot;              // [B]
  std::vector<typename Bits<T>::type> exact;   // [B, Lp]
  std::vector<uint8_t> all_in;                 // [B] every slot and sink is attended (the steady state)
};

// sum_{i in [a, b)} q[i] (z[i] + vz k[i]): a moment of the far scores read from the normaliser row with
// this step's key added; four sums, so the adds do not wait on each other
template <typename T, typename TS>
inline TS moment(const T* q, const TS* z, TS vz, const T* k, int64_t a, int64_t b) {
  TS acc[4] = {TS(0), TS(0), TS(0), TS(0)};
  int64_t i = a;
  for (; i + 4 <= b; i += 4)
    for (int l = 0; l < 4; ++l) acc[l] += TS(q[i + l]) * (z[i + l] + vz * TS(k[i + l]));
  for (; i < b; ++i) acc[0] += TS(q[i]) * (z[i] + vz * TS(k[i]));
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// heads n0 .. n1-1 of a window decode step, in one thread's buffers; off [P + 1] the degree offsets
template <typename T, typename TS>
void window_heads(const WindowDecodeArgs& w, const WindowDecodeTensors& t, const Rows<T>& rows, const int64_t* off,
                  int64_t n0, int64_t n1, WindowBuffers<T, TS>& buf) {
  const DecodeArgs& a = w.base;
  const int64_t G = a.G, d = a.d, Ev = a.Ev, D = a.D, F = Ev + 1, P = a.P, W = w.W, S = w.S, ld = buf.ld;
  const int64_t slot = W ? t.n_tokens % W : 0, Dm = off[P < 3 ? P : 3];
  const T sq = T(a.sq), sk = T(a.sk);
  const T *q = static_cast<const T*>(t.q), *k = static_cast<const T*>(t.k), *v = static_cast<const T*>(t.v);
  const T *q_far = static_cast<const T*>(t.q_far), *k_far = static_cast<const T*>(t.k_far);
  const T *alpha = static_cast<const T*>(t.alpha), *beta = static_cast<const T*>(t.beta);
  const TS* mu = static_cast<const TS*>(t.key_centre);
  TS *win_k = static_cast<TS*>(t.win_k), *win_v = static_cast<TS*>(t.win_v);
  // the ring before the step: its own buffers (copied head by head into win_k / win_v just before the head
  // writes its slot) or, in place, the same
  const TS* ring_k = t.win_k_src == nullptr ? win_k : static_cast<const TS*>(t.win_k_src);
  const TS* ring_v = t.win_v_src == nullptr ? win_v : static_cast<const TS*>(t.win_v_src);
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
        const T x = k_far ? k_far[n * d + j] : W ? T(ring_k[(n * W + slot) * d + j]) : k[n * d + j];
        buf.key[j] = mu ? x - T(mu[n * d + j]) : x;
      }
      feat.degree01(buf.key.data(), sk, base);
    } else {
      feat.degree01(nullptr, sk, base);  // a padded key's NaNs must not be read
    }
    for (int64_t g = 0; g < G; ++g) {
      T* x = buf.qs.data() + ((n - n0) * G + g) * d;
      for (int64_t j = 0; j < d; ++j) x[j] = q[(n * G + g) * d + j] * sq;
      T* xf = x;  // the far part's query: its own with q_far
      if (q_far) {
        xf = buf.qf.data() + ((n - n0) * G + g) * d;
        for (int64_t j = 0; j < d; ++j) xf[j] = q_far[(n * G + g) * d + j] * sq;
      }
      feat.degree01(xf, T(1), base + (1 + g) * ld);
    }
  }
  feat.build(phi, (n1 - n0) * (1 + G), ld);

  // per head: the absorbed key's v~, the new key into its slots, the centre of each query and its query
  // row scaled per degree by a_m(c'). A loop of its own: each head's centre is a chain of dependent
  // steps (moments, a division, the coefficients), which overlap across heads here
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = n / w.Hkv, h0 = (n % w.Hkv) * G, i = n - n0;
    const T* pk = phi + i * (1 + G) * ld;
    T* pq = phi + i * (1 + G) * ld + ld;
    const T* qs = (q_far ? buf.qf : buf.qs).data() + i * G * d;  // the far part's queries (delta)
    T* vt = buf.vts.data() + i * F;
    // v~ of the absorbed key, read before the new key takes its slot
    const bool use = rows.absorb[b];
    for (int64_t f = 0; f < Ev; ++f) vt[f] = !use ? T(0) : W ? T(ring_v[(n * W + slot) * Ev + f]) : v[n * Ev + f];
    if (ring_k != win_k) {  // the head's ring into the new buffers, where the exact part reads it next
      std::memcpy(win_k + n * W * d, ring_k + n * W * d, sizeof(TS) * W * d);
      std::memcpy(win_v + n * W * Ev, ring_v + n * W * Ev, sizeof(TS) * W * Ev);
    }
    if (t.sink_k_src != nullptr) {  // likewise the sinks, before the new key may take a free one
      std::memcpy(sink_k + n * S * d, static_cast<const TS*>(t.sink_k_src) + n * S * d, sizeof(TS) * S * d);
      std::memcpy(sink_v + n * S * Ev, static_cast<const TS*>(t.sink_v_src) + n * S * Ev, sizeof(TS) * S * Ev);
    }
    vt[Ev] = use ? T(1) : T(0);
    if (W) {
      for (int64_t j = 0; j < d; ++j) win_k[(n * W + slot) * d + j] = TS(k[n * d + j]);
      for (int64_t f = 0; f < Ev; ++f) win_v[(n * W + slot) * Ev + f] = TS(v[n * Ev + f]);
    }
    if (const int64_t s = rows.sink_slot[b]; s >= 0) {
      for (int64_t j = 0; j < d; ++j) sink_k[(n * S + s) * d + j] = TS(k[n * d + j]);
      for (int64_t f = 0; f < Ev; ++f) sink_v[(n * S + s) * Ev + f] = TS(v[n * Ev + f]);
    }
    const TS* z = static_cast<const TS*>(t.S_in) + (n * F + F - 1) * D;  // the normaliser row, before this key
    const TS vz = TS(vt[Ev]);
    const TS n_far = z[0] + vz * TS(pk[0]);  // far keys after the sweep: the normaliser's degree-0 entry
    buf.has_far[i] = n_far > TS(0);
    for (int64_t g = 0; g < G; ++g) {
      T* row = pq + g * ld;
      T delta = T(0);
      if (mu)
        for (int64_t j = 0; j < d; ++j) delta += qs[g * d + j] * (T(mu[n * d + j]) * sk);
      T shifted = -delta;
      buf.c[i * G + g] = TS(0);
      if (w.recentre) {
        // moments of the far scores over the far keys, this step's included (as the sweep adds it); the
        // second only for a centre below the mean
        const TS a = TS(alpha[h0 + g]);
        const TS N = n_far, m1 = moment<T, TS>(row, z, vz, pk, 1, 1 + d);
        const TS m2 = a == TS(0) ? TS(0) : moment<T, TS>(row, z, vz, pk, 1 + d, Dm);
        shifted = T(centre<TS>(N, m1, m2, a));
        buf.c[i * G + g] = TS(shifted + delta);
      }
      if (scaled) {
        T* coef = buf.coef.data();
        coefficients<T>(shifted, P, coef);
        for (int64_t p = 0; p + 1 < P; ++p)  // a_{P-1} = 1: the last degree, the largest block, stays as it is
          scale_range<T>(row + off[p], off[p + 1] - off[p], coef[p]);
      }
    }
  }
  // per head: the sweep that absorbs the leaving key into the far state and reads it
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t i = n - n0;
    const T* pk = phi + i * (1 + G) * ld;
    const TS* src = static_cast<const TS*>(t.S_in) + n * F * D;
    TS* dst = static_cast<TS*>(t.S_out) + n * F * D;
    sata::sweep<T, TS>(src, dst, D, F, G, pk, pk + ld, ld, buf.vts.data() + i * F, buf.uf.data() + i * G * F);
  }

  // the exact part of every query of the group, stage by stage: within a stage the queries do not
  // wait on each other (one query's steps form a chain of dependent reductions)
  using VE = Vec<T>;
  typedef typename Bits<T>::type MaskLane;
  typedef MaskLane Mask __attribute__((vector_size(sizeof(typename VE::type))));
  const int64_t nq = (n1 - n0) * G, Lp = rows.Lp;
  const typename VE::type ninf = typename VE::type{} - std::numeric_limits<T>::infinity();
  for (int64_t iq = 0; iq < nq; ++iq) {  // scores, scaled; out of the window -inf (a key there may be NaN)
    const int64_t n = n0 + iq / G;
    T* e = buf.e.data() + iq * Lp;
    dots<T, TS>(buf.qs.data() + iq * d, win_k + n * W * d, W, d, e);
    dots<T, TS>(buf.qs.data() + iq * d, sink_k + n * S * d, S, d, e + W);
    const MaskLane* in = rows.exact.data() + (n / w.Hkv) * Lp;
    typename VE::type top = ninf;
    for (int64_t j = 0; j < Lp; j += VE::W) {
      Mask m;
      std::memcpy(&m, in + j, sizeof(m));
      const typename VE::type s = m != 0 ? VE::load(e + j) * sk : ninf;  // the padding is stale: -inf too
      VE::store(e + j, s);
      top = s > top ? s : top;
    }
    buf.top[iq] = lanes_max<T>(top);
  }
  for (int64_t iq = 0; iq < nq; ++iq) {  // weights e^{s - max} and their sum (s - max <= 0, or -inf, or NaN)
    T* e = buf.e.data() + iq * Lp;
    const T m_safe = std::isfinite(buf.top[iq]) ? buf.top[iq] : T(0);
    typename VE::type sum{};
    for (int64_t j = 0; j < Lp; j += VE::W) {
      const typename VE::type p = vexp_le0<T>(VE::load(e + j) - m_safe);
      VE::store(e + j, p);
      sum += p;
    }
    buf.den[iq] = lanes_sum<T>(sum);
  }
  for (int64_t iq = 0; iq < nq; ++iq) {  // the weighted values
    const int64_t n = n0 + iq / G;
    const T* e = buf.e.data() + iq * Lp;
    T* num = buf.num.data() + iq * Ev;
    for (int64_t f = 0; f < Ev; ++f) num[f] = T(0);
    if (rows.all_in[n / w.Hkv]) {
      weighted_all_rows<T, TS>(e, win_v + n * W * Ev, W, Ev, num);
      weighted_all_rows<T, TS>(e + W, sink_v + n * S * Ev, S, Ev, num);
    } else {
      weighted_rows<true, T, TS>(e, win_v + n * W * Ev, W, Ev, num);
      weighted_rows<true, T, TS>(e + W, sink_v + n * S * Ev, S, Ev, num);
    }
  }
  // both parts scaled to their common maximum m, one normaliser: the exponents of all the group's queries, their
  // e^x as whole vectors (one libm call per query cost ~0.5 us a step), then the outputs. A query whose beta is 0
  // has no far part: its maximum is the exact part's alone (with c in it, exact scores ~88 below c would underflow)
  TS* scale = buf.scale.data();
  const auto weighted = [&](int64_t iq) {
    const int64_t n = n0 + iq / G;
    return buf.has_far[iq / G] && beta[(n % w.Hkv) * G + iq % G] != T(0);
  };
  for (int64_t iq = 0; iq < nq; ++iq) {
    const bool far = weighted(iq);
    const TS c = buf.c[iq], m_exact = TS(buf.top[iq]);
    TS m = far && c > m_exact ? c : m_exact;
    if (!std::isfinite(m)) m = TS(0);
    scale[iq] = m_exact - m;                                               // -inf without exact keys: e^x 0
    scale[nq + iq] = far ? c - m : TS(0);
  }
  for (int64_t j = 0; j < 2 * nq; j += Vec<TS>::W)
    Vec<TS>::store(scale + j, sata::vexp<TS>(Vec<TS>::load(scale + j)));
  for (int64_t iq = 0; iq < nq; ++iq) {
    const int64_t n = n0 + iq / G, g = iq % G;
    const TS e_exact = scale[iq], e_far = weighted(iq) ? TS(beta[(n % w.Hkv) * G + g]) * scale[nq + iq] : TS(0);
    const TS* u = buf.uf.data() + iq * F;
    const T* num = buf.num.data() + iq * Ev;
    const TS den = e_exact * TS(buf.den[iq]) + e_far * u[Ev];
    T* yq = y + (n * G + g) * Ev;
    const TS inv = TS(1) / den;
    for (int64_t f = 0; f < Ev; ++f)
      yq[f] = den <= TS(0) ? T(0) : T((e_exact * TS(num[f]) + e_far * u[f]) * inv);  // NaN propagates
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
  const int64_t Lp = sata::round_up(W + S, Vec<T>::W);
  // kept between steps (assign() reuses the vectors' memory); a reference, so the lambda below captures this
  // thread's object (the name of a thread_local would mean each worker thread's own)
  thread_local Rows<T> kept_rows;
  Rows<T>& rows = kept_rows;
  rows.Lp = Lp;
  rows.absorb.assign(B, 0);
  rows.sink_slot.assign(B, -1);
  rows.exact.assign(B * Lp, 0);
  rows.all_in.assign(B, 0);
  if (t.win_keep_src != nullptr) std::memcpy(t.win_keep, t.win_keep_src, sizeof(uint8_t) * B * W);  // new buffers
  if (t.sink_pos_src != nullptr) std::memcpy(t.sink_pos, t.sink_pos_src, sizeof(int64_t) * B * S);
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
    for (int64_t j = 0; j < W; ++j) rows.exact[b * Lp + j] = t.win_keep[b * W + j] ? -1 : 0;
    for (int64_t j = 0; j < S; ++j) rows.exact[b * Lp + W + j] = t.sink_pos[b * S + j] >= 0 ? -1 : 0;
    rows.all_in[b] = std::all_of(&rows.exact[b * Lp], &rows.exact[b * Lp] + W + S, [](auto m) { return m != 0; });
  }
  using Buffers = WindowBuffers<T, TS>;
  const double flops = sata::work(a.N, 1, a.G, a.Ev + 1, a.D) + 2.0 * a.N * a.G * (W + S) * (d + a.Ev);
  sata::share_heads(
      a.N, Buffers::kHeads, flops, a.work_per_thread, [&]() -> Buffers& { return sata::reused<Buffers>({a.D, a.G, a.Ev, d, P, Lp}, w, Lp); },
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
