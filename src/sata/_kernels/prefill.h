// The pieces of the fused chunked prefill (prefill.cpp) that the window-mode prefill (prefill_window.cpp)
// shares: chunk constants, feature rows of a chunk, the small products, and one head's workspace.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

// the loops below are written for whole 64-byte vectors: GCC would otherwise vectorise them for 32 bytes
// where the target has 64-byte vectors (its default for these CPUs)
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")

namespace sata {

constexpr int64_t C = 32;    // tokens per chunk: the vector width of most loops
constexpr int64_t DB = 8;    // feature rows per update block
constexpr int64_t VW = 16;   // lanes the update pads value columns to

// rows 0..D-1 of phi_t [D][C] from scaled inputs x_t [d][C] (degree 1 rows are x_t itself)
template <typename T>
inline void features_t(const T* x_t, int64_t d, int64_t P, const int64_t* prefix_len, const T* weight, T* phi_t) {
  T* row = phi_t;
  for (int64_t i = 0; i < C; ++i) row[i] = T(1);
  if (P == 1) return;
  std::memcpy(phi_t + C, x_t, sizeof(T) * d * C);
  const T* prev = phi_t + C;
  T* out = phi_t + (1 + d) * C;
  const T* w = weight;
  using VV = Vec<T>;
  using V = typename VV::type;
  constexpr int64_t L = VV::W, NV = C / L;
  for (int64_t p = 2; p < P; ++p) {
    T* block = out;
    for (int64_t j = 0; j < d; ++j) {
      V xj[NV];
      for (int64_t n = 0; n < NV; ++n) xj[n] = VV::load(x_t + j * C + n * L);
      const int64_t len = prefix_len[(p - 2) * d + j];
      for (int64_t r = 0; r < len; ++r) {
        const T* src = prev + r * C;
        const T wr = w[r];
        for (int64_t n = 0; n < NV; ++n) VV::store(out + n * L, VV::load(src + n * L) * (xj[n] * wr));
        out += C;
      }
      w += len;
    }
    prev = block;
  }
}

constexpr int64_t RJ = 4;  // key rows per block of dot products

// s[j][i] = sum_e key[j][e es] qx[e][i] for rows j < round_up(n, RJ) (key[] holds that many rows): dot
// products of keys (rows, element stride es) and a chunk's queries (lanes, feature-major qx [d][C]); blocks of
// RJ rows x the chunk's vectors keep independent sums in registers (one sum per vector would wait on each
// product's latency)
template <typename T>
inline void dots(const T* const* key, int64_t es, int64_t n, const T* __restrict__ qx, int64_t d, T* __restrict__ s) {
  using VV = Vec<T>;
  using V = typename VV::type;
  constexpr int64_t L = VV::W, NB = C / L;
  static_assert(C % L == 0, "a chunk is whole vectors");
  for (int64_t j0 = 0; j0 < n; j0 += RJ) {
    const T* kr[RJ];
    V acc[RJ][NB];
    for (int64_t r = 0; r < RJ; ++r) {
      kr[r] = key[j0 + r];
      for (int64_t b = 0; b < NB; ++b) acc[r][b] = V{};
    }
    for (int64_t e = 0; e < d; ++e) {
      V qe[NB];
      for (int64_t b = 0; b < NB; ++b) qe[b] = VV::load(qx + e * C + b * L);
      for (int64_t r = 0; r < RJ; ++r)
        for (int64_t b = 0; b < NB; ++b) acc[r][b] += kr[r][e * es] * qe[b];
    }
    for (int64_t r = 0; r < RJ; ++r)
      for (int64_t b = 0; b < NB; ++b) VV::store(s + (j0 + r) * C + b * L, acc[r][b]);
  }
}

// U[f][i] (+)= sum_r M[r][f] * X[r][i] for f0 <= f < f0 + NB: a [NB x K] x [K x C] product with the NB x C
// sums in vector registers
template <typename T, int NB>
inline void gemm_block(const T* __restrict__ M, int64_t ldm, int64_t f0, int64_t K, const T* __restrict__ X,
                       T* __restrict__ U, bool accumulate) {
  using VV = Vec<T>;
  using V = typename VV::type;
  constexpr int64_t L = VV::W, NV = C / L;
  V acc[NB][NV];
  for (int64_t b = 0; b < NB; ++b)
    for (int64_t n = 0; n < NV; ++n) acc[b][n] = accumulate ? VV::load(U + (f0 + b) * C + n * L) : V{};
  for (int64_t r = 0; r < K; ++r) {
    V x[NV];
    for (int64_t n = 0; n < NV; ++n) x[n] = VV::load(X + r * C + n * L);
    const T* m = M + r * ldm + f0;
    for (int64_t b = 0; b < NB; ++b)
      for (int64_t n = 0; n < NV; ++n) acc[b][n] += m[b] * x[n];
  }
  for (int64_t b = 0; b < NB; ++b)
    for (int64_t n = 0; n < NV; ++n) VV::store(U + (f0 + b) * C + n * L, acc[b][n]);
}

// vector registers of the target (of VBYTES each)
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int64_t VREGS = 32;
#else
constexpr int64_t VREGS = 16;
#endif

// most output rows (value columns) per register block of gemm_t: NB x (C / lanes) sums, a row of X and a
// broadcast in registers (float on AVX-512: 10, so F = Ev + 1 <= 10 is one pass over X)
template <typename T>
constexpr int64_t gemm_rows() {
  constexpr int64_t nv = C / Vec<T>::W;
  return std::max<int64_t>(1, std::min<int64_t>(10, (VREGS - nv - 2) / nv));
}

template <typename T>
inline void gemm_t(const T* M, int64_t ldm, int64_t F, int64_t K, const T* X, T* U, bool accumulate) {
  // F rows in as few blocks as possible, of balanced sizes (F = 17: 9 + 8, not 10 + 7)
  constexpr int64_t RB = gemm_rows<T>();
  const int64_t blocks = (F + RB - 1) / RB;
  for (int64_t b = 0, f0 = 0; b < blocks; ++b) {
    const int64_t n = (F - f0 + (blocks - b) - 1) / (blocks - b);
    switch (n) {
      case 10: gemm_block<T, 10>(M, ldm, f0, K, X, U, accumulate); break;
      case 9: gemm_block<T, 9>(M, ldm, f0, K, X, U, accumulate); break;
      case 8: gemm_block<T, 8>(M, ldm, f0, K, X, U, accumulate); break;
      case 7: gemm_block<T, 7>(M, ldm, f0, K, X, U, accumulate); break;
      case 6: gemm_block<T, 6>(M, ldm, f0, K, X, U, accumulate); break;
      case 5: gemm_block<T, 5>(M, ldm, f0, K, X, U, accumulate); break;
      case 4: gemm_block<T, 4>(M, ldm, f0, K, X, U, accumulate); break;
      case 3: gemm_block<T, 3>(M, ldm, f0, K, X, U, accumulate); break;
      case 2: gemm_block<T, 2>(M, ldm, f0, K, X, U, accumulate); break;
      default: gemm_block<T, 1>(M, ldm, f0, K, X, U, accumulate); break;
    }
    f0 += n;
  }
}

// one feature row r of the update below, for f < n: summed over the chunk in acc [n], then added to Sp
template <typename T, typename TS>
inline void update_row(TS* __restrict__ Sp, int64_t Fp, int64_t r, int64_t n, const T* __restrict__ phi_t,
                       const T* __restrict__ vt, T* __restrict__ acc) {
  std::fill(acc, acc + n, T(0));
  for (int64_t i = 0; i < C; ++i) {
    const T w = phi_t[r * C + i];
    const T* vi = vt + i * Fp;
#pragma omp simd
    for (int64_t f = 0; f < n; ++f) acc[f] += w * vi[f];
  }
  TS* s = Sp + r * Fp;
#pragma omp simd
  for (int64_t f = 0; f < n; ++f) s[f] += TS(acc[f]);
}

// f(std::integral_constant<int, n>) for a run-time n in 1 .. N (nothing for n outside): a register block
// of n rows, its size a template argument
template <int N, typename F>
inline void with_count(int64_t n, const F& f) {
  if constexpr (N > 0) {
    if (n == N) return f(std::integral_constant<int, N>{});
    with_count<N - 1>(n, f);
  }
}

// rows r0 .. r0 + NR - 1 of Sp[D][f] += sum_i phi_t[D][i] * vt[i][f], f < W = NV * VW: NR x NV accumulators
// in registers, summed over the chunk in T, added to the state in its own precision TS
template <typename T, typename TS, int NV, int NR>
inline void update_rows(TS* __restrict__ Sp, int64_t Fp, int64_t r0, const T* __restrict__ phi_t,
                        const T* __restrict__ vt) {
  constexpr int64_t W = NV * VW;
  T acc[NR][W];
  for (int64_t b = 0; b < NR; ++b)
#pragma omp simd
    for (int64_t f = 0; f < W; ++f) acc[b][f] = T(0);
  for (int64_t i = 0; i < C; ++i) {
    const T* vi = vt + i * Fp;
#pragma GCC unroll 8
    for (int64_t b = 0; b < NR; ++b) {
      const T w = phi_t[(r0 + b) * C + i];
#pragma omp simd
      for (int64_t f = 0; f < W; ++f) acc[b][f] += w * vi[f];
    }
  }
  for (int64_t b = 0; b < NR; ++b) {
    TS* s = Sp + (r0 + b) * Fp;
#pragma omp simd
    for (int64_t f = 0; f < W; ++f) s[f] += TS(acc[b][f]);
  }
}

// Sp[D][f] += sum_i phi_t[D][i] * vt[i][f] for all f < Fp (Fp = NV * VW): blocks of DB rows, then the
// rows left over as one block (one row at a time would wait on each product's latency)
template <typename T, typename TS, int NV>
inline void update_state_nv(TS* __restrict__ Sp, int64_t Fp, int64_t D, const T* __restrict__ phi_t,
                            const T* __restrict__ vt) {
  int64_t r0 = 0;
  for (; r0 + DB <= D; r0 += DB) update_rows<T, TS, NV, DB>(Sp, Fp, r0, phi_t, vt);
  with_count<DB - 1>(D - r0, [&](auto nr) { update_rows<T, TS, NV, decltype(nr)::value>(Sp, Fp, r0, phi_t, vt); });
}

#if defined(__AVX512F__)  // (without 64-byte registers its 64-bit broadcasts and shuffles go through memory)
// The update for 16-lane floats and at most 9 columns (values of up to 8, the ones column): tokens in pairs,
// lane 2f + j of a product holding column f of token 2m + j, so each product is a 64-bit broadcast of two
// features (phi_t[r][2m], phi_t[r][2m + 1]) times a whole vector, half the products of the padded update.
// Column 8 (the ones column of 8 values), when there is one, is a row sum of phi_t weighted by the keep flags.
namespace pairs {

using VF = Vec<float>::type;
typedef double VD __attribute__((vector_size(sizeof(VF))));
typedef Bits<float>::type VM __attribute__((vector_size(sizeof(VF))));
static_assert(Vec<float>::W == 16, "pairs of 8 columns fill a 16-lane vector");

template <int... l>
constexpr VM mask(int (*f)(int), std::integer_sequence<int, l...>) { return VM{f(l)...}; }
constexpr auto lanes = std::make_integer_sequence<int, 16>{};
// [a0 b0 a1 b1 ... a7 b7]: columns 0..7 of two tokens interleaved
constexpr VM zip = mask([](int l) { return (l % 2) * 16 + l / 2; }, lanes);
// the even and odd lanes of a, then of b: the two tokens' halves of a pair, for two feature rows
constexpr VM even = mask([](int l) { return (l / 8) * 16 + (l % 8) * 2; }, lanes);
constexpr VM odd = mask([](int l) { return (l / 8) * 16 + (l % 8) * 2 + 1; }, lanes);

// lane k of the result, k < 8: the sum of the lanes of x[k] (rows past n: zero); fold in halves, rows paired
template <int NR>
inline VF row_sums(const VF* x) {
  VF s[8];
  for (int b = 0; b < 8; ++b) s[b] = b < NR ? x[b] : VF{};
  // 8 rows of 16 lanes -> 4 vectors of 2 rows x 8 lanes -> 2 of 4 x 4 -> 1 of 8 x 2 -> 8 sums
  constexpr VM h1a = mask([](int l) { return (l / 8) * 16 + l % 8; }, lanes);
  constexpr VM h1b = mask([](int l) { return (l / 8) * 16 + l % 8 + 8; }, lanes);
  constexpr VM h2a = mask([](int l) { return (l / 8) * 16 + ((l / 4) % 2) * 8 + l % 4; }, lanes);
  constexpr VM h2b = mask([](int l) { return (l / 8) * 16 + ((l / 4) % 2) * 8 + l % 4 + 4; }, lanes);
  constexpr VM h3a = mask([](int l) { return (l / 8) * 16 + ((l / 2) % 4) * 4 + l % 2; }, lanes);
  constexpr VM h3b = mask([](int l) { return (l / 8) * 16 + ((l / 2) % 4) * 4 + l % 2 + 2; }, lanes);
  constexpr VM h4a = mask([](int l) { return (l % 8) * 2; }, lanes);
  constexpr VM h4b = mask([](int l) { return (l % 8) * 2 + 1; }, lanes);
  VF t1[4], t2[2];
  for (int b = 0; b < 4; ++b)
    t1[b] = __builtin_shuffle(s[2 * b], s[2 * b + 1], h1a) + __builtin_shuffle(s[2 * b], s[2 * b + 1], h1b);
  for (int b = 0; b < 2; ++b)
    t2[b] = __builtin_shuffle(t1[2 * b], t1[2 * b + 1], h2a) + __builtin_shuffle(t1[2 * b], t1[2 * b + 1], h2b);
  const VF t3 = __builtin_shuffle(t2[0], t2[1], h3a) + __builtin_shuffle(t2[0], t2[1], h3b);
  return __builtin_shuffle(t3, t3, h4a) + __builtin_shuffle(t3, t3, h4b);
}

// rows r0 .. r0 + NR - 1 (NR <= 8)
template <typename TS, int NR>
inline void rows(TS* __restrict__ Sp, int64_t r0, const float* __restrict__ phi_t, const VF* __restrict__ vpair,
                 VF keep0, VF keep1, bool ones) {
  VF acc[NR];
  for (int b = 0; b < NR; ++b) acc[b] = VF{};
  for (int64_t m = 0; m < C / 2; ++m) {
    const VF vv = vpair[m];
    for (int b = 0; b < NR; ++b) {
      double two;  // phi_t[r][2m], phi_t[r][2m + 1]
      std::memcpy(&two, phi_t + (r0 + b) * C + 2 * m, sizeof(two));
      acc[b] += reinterpret_cast<VF>(VD{two, two, two, two, two, two, two, two}) * vv;
    }
  }
  typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
  typedef TS S8 __attribute__((vector_size(8 * sizeof(TS))));
  for (int b = 0; b < NR; b += 2) {  // the two tokens of a pair summed: rows b, b + 1 side by side
    const VF y = acc[b + 1 < NR ? b + 1 : b];
    const VF t = __builtin_shuffle(acc[b], y, even) + __builtin_shuffle(acc[b], y, odd);
    V8 half[2];
    std::memcpy(half, &t, sizeof(t));
    for (int j = 0; j < 2 && b + j < NR; ++j) {
      S8 st;
      TS* s = Sp + (r0 + b + j) * 16;
      std::memcpy(&st, s, sizeof(st));
      st += __builtin_convertvector(half[j], S8);
      std::memcpy(s, &st, sizeof(st));
    }
  }
  if (ones) {
    VF z[NR];
    for (int b = 0; b < NR; ++b) {
      const float* ph = phi_t + (r0 + b) * C;
      z[b] = Vec<float>::load(ph) * keep0 + Vec<float>::load(ph + 16) * keep1;
    }
    const VF zs = row_sums<NR>(z);
    for (int b = 0; b < NR; ++b) Sp[(r0 + b) * 16 + 8] += TS(zs[b]);
  }
}

template <typename TS>
inline void update(TS* Sp, int64_t D, int64_t F, const float* phi_t, const float* vt) {
  VF vpair[C / 2];
  for (int64_t m = 0; m < C / 2; ++m)
    vpair[m] = __builtin_shuffle(Vec<float>::load(vt + 2 * m * 16), Vec<float>::load(vt + (2 * m + 1) * 16), zip);
  float keep[C];  // column 8 of the chunk's rows
  for (int64_t i = 0; i < C; ++i) keep[i] = vt[i * 16 + 8];
  const VF keep0 = Vec<float>::load(keep), keep1 = Vec<float>::load(keep + 16);
  const bool ones = F == 9;
  int64_t r0 = 0;
  for (; r0 + 8 <= D; r0 += 8) rows<TS, 8>(Sp, r0, phi_t, vpair, keep0, keep1, ones);
  with_count<7>(D - r0, [&](auto nr) { rows<TS, decltype(nr)::value>(Sp, r0, phi_t, vpair, keep0, keep1, ones); });
}

}  // namespace pairs
#endif

// Sp[D][f] += sum_i phi_t[D][i] * vt[i][f] for f < F (the columns up to Fp are zero in vt)
template <typename T, typename TS>
inline void update_state(TS* Sp, int64_t Fp, int64_t D, int64_t F, const T* phi_t, const T* vt) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (Fp == 16 && F <= 9) return pairs::update<TS>(Sp, D, F, phi_t, vt);
  }
#endif
  switch (Fp / VW) {
    case 1: update_state_nv<T, TS, 1>(Sp, Fp, D, phi_t, vt); return;
    case 2: update_state_nv<T, TS, 2>(Sp, Fp, D, phi_t, vt); return;
    default:  // wide values: one feature row at a time
      std::vector<T> acc(Fp);
      for (int64_t r = 0; r < D; ++r) update_row(Sp, Fp, r, Fp, phi_t, vt, acc.data());
  }
}

template <typename T, typename TS>
struct Head {
  int64_t G, Lq, Lk, d, Ev, D, P, F, Fp;
  const int64_t* prefix_len;
  const T* weight;
  T sq, sk;
  // workspace
  // M = [state (D rows); v~ of the chunk (C rows)] x Fp and X = [phi(Q) (D rows); A (C rows)] x C,
  // so one product U = M^T X reads the earlier chunks' state and the chunk itself
  // (64-byte aligned: rows of C lanes or Fp columns are whole vectors)
  avector<TS> Sp;          // the head's state [D][Fp] in the state's precision (+ the v~ rows when TS == T)
  avector<T> Mf;           // when TS != T: [state in the compute precision; v~ rows]
  avector<T> kx, qx, phik, X, U;
  avector<T> krows;        // [C][d] the chunk's keys as they come, token-major
  std::vector<T> inv_fact; // [P] 1 / p!: the truncated series' coefficients
  std::vector<const T*> key_rows;  // [C] key j of kx (element stride C)
  T* M;                    // Sp or Mf
  T* vt;                   // the v~ rows of M: [C][Fp]

  Head(int64_t G_, int64_t Lq_, int64_t Lk_, int64_t d_, int64_t Ev_, int64_t D_, int64_t P_, const int64_t* pl,
       const T* w, T sq_, T sk_)
      : G(G_), Lq(Lq_), Lk(Lk_), d(d_), Ev(Ev_), D(D_), P(P_), F(Ev_ + 1), Fp(round_up(Ev_ + 1, VW)),
        prefix_len(pl), weight(w), sq(sq_), sk(sk_),
        Sp((D_ + (std::is_same<T, TS>::value ? C : 0)) * round_up(Ev_ + 1, VW)),
        Mf(std::is_same<T, TS>::value ? 0 : (D_ + C) * round_up(Ev_ + 1, VW)), kx(d_ * C), qx(d_ * C), phik(D_ * C),
        X((D_ + C) * C), U(round_up(Ev_ + 1, VW) * C), krows(C * d_), inv_fact(P_, T(1)), key_rows(C) {
    for (int64_t p = 1; p < P; ++p) inv_fact[p] = inv_fact[p - 1] / T(p);
    for (int64_t j = 0; j < C; ++j) key_rows[j] = kx.data() + j;
    if constexpr (std::is_same<T, TS>::value) {
      M = reinterpret_cast<T*>(Sp.data());
    } else {
      M = Mf.data();
    }
    vt = M + D * Fp;
  }

  // scaled keys kx [d][C] and value rows vt [C][Fp] of tokens t0 .. t0+c-1 (zero beyond c or masked)
  int64_t k_sl = 0, v_sl = 0, q_sl = 0, q_sh = 0, y_sl = 0, y_sh = 0;

  void load_keys(const T* k, const T* v, const uint8_t* keep, int64_t t0, int64_t c) {
    load_rows([&](int64_t t) { return k + t * k_sl; }, [&](int64_t t) { return v + t * v_sl; }, keep, t0, c, nullptr);
  }

  // load_keys with token t's key and value rows at key_row(t), value_row(t), and the keys minus centre
  // (null: none) before they are scaled
  template <typename KeyRow, typename ValueRow>
  void load_rows(const KeyRow& key_row, const ValueRow& value_row, const uint8_t* keep, int64_t t0, int64_t c,
                 const T* centre) {
    std::fill(vt, vt + C * Fp, T(0));
    // the chunk's key rows, token-major [C][d] (dropped and missing tokens zero), then feature-major kx [d][C]
    bool dropped = false;
    for (int64_t i = 0; i < C; ++i) {
      const bool kept = i < c && (keep == nullptr || keep[t0 + i]);
      T* kc = krows.data() + i * d;
      T* row = vt + i * Fp;
      dropped |= !kept;
      if (!kept) {
        std::fill(kc, kc + d, T(0));
        continue;
      }
      std::memcpy(kc, key_row(t0 + i), sizeof(T) * d);
      std::memcpy(row, value_row(t0 + i), sizeof(T) * Ev);
      row[Ev] = T(1);
    }
    for (int64_t e = 0; e < d; ++e) {
      const T ce = centre == nullptr ? T(0) : centre[e];
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) kx[e * C + i] = (krows[i * d + e] - ce) * sk;
    }
    if (dropped && centre != nullptr)  // a dropped key stays zero after centring
      for (int64_t i = 0; i < C; ++i)
        if (!(i < c && (keep == nullptr || keep[t0 + i])))
          for (int64_t e = 0; e < d; ++e) kx[e * C + i] = T(0);
    features_t(kx.data(), d, P, prefix_len, weight, phik.data());
  }

  // the chunk's queries t0 .. t0 + c - 1, scaled, into qx [d][C] (the lanes past c zero)
  void load_qx(const T* q, int64_t t0, int64_t c) {
    if (c < C) std::fill(qx.begin(), qx.end(), T(0));
    const T* qr = q + t0 * q_sl;
    for (int64_t e = 0; e < d; ++e) {
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) qx[e * C + i] = qr[i * q_sl + e] * sq;
    }
  }

  // load_qx() and the queries' features (rows 0 .. D - 1 of X)
  void load_queries(const T* q, int64_t t0, int64_t c) {
    load_qx(q, t0, c);
    features_t(qx.data(), d, P, prefix_len, weight, X.data());
  }

  // A[j][i] = T_P(k_j . q_i) for j <= i (causal within the chunk), 0 otherwise: rows D.. of X
  // (keys j >= c are zero in kx, and so are their v~ rows)
  void scores() {
    T* A = X.data() + D * C;
    dots(key_rows.data(), C, C, qx.data(), d, A);
    using VV = Vec<T>;
    using V = typename VV::type;
    typedef typename Bits<T>::type Lane;
    typedef Lane I __attribute__((vector_size(sizeof(V))));
    constexpr int64_t L = VV::W;
    I iota;
    for (int64_t l = 0; l < L; ++l) iota[l] = Lane(l);
    for (int64_t j = 0; j < C; ++j) {
      T* a = A + j * C;
      for (int64_t i = 0; i < C; i += L) {
        // Horner: T_P(s) = c_0 + s (c_1 + s (... + s c_{P-1})), one multiply-add per term, in registers
        const V sv = VV::load(a + i);
        V r = V{} + inv_fact[P - 1];
        for (int64_t p = P - 2; p >= 0; --p) r = r * sv + inv_fact[p];
        VV::store(a + i, iota + Lane(i) >= Lane(j) ? r : V{});  // causal within the chunk
      }
    }
  }

  void write_out(T* y, int64_t t0, int64_t c) const {
    T rz[C];  // one division per token; 0 where the normaliser is not positive (NaN propagates)
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) rz[i] = U[Ev * C + i] <= T(0) ? T(0) : T(1) / U[Ev * C + i];
    for (int64_t i = 0; i < c; ++i) {
      T* yr = y + (t0 + i) * y_sl;
      for (int64_t f = 0; f < Ev; ++f) yr[f] = U[f * C + i] * rz[i];
    }
  }

  // refresh the state rows of M from Sp (in the compute precision) when they are not the same memory
  void sync_state() {
    if constexpr (!std::is_same<T, TS>::value) {
      for (int64_t i = 0; i < D * Fp; ++i) Mf[i] = T(Sp[i]);
    }
  }

  void run(const T* q, const T* k, const T* v, const uint8_t* keep, TS* S, int64_t s_d, int64_t s_f, T* y,
           bool causal) {
    std::fill(Sp.begin(), Sp.end(), TS(0));
    for (int64_t r = 0; r < D; ++r)
      for (int64_t f = 0; f < F; ++f) Sp[r * Fp + f] = S[r * s_d + f * s_f];
    sync_state();
    if (causal) {  // Lq == Lk
      for (int64_t t0 = 0; t0 < Lk; t0 += C) {
        const int64_t c = std::min(C, Lk - t0);
        load_keys(k, v, keep, t0, c);
        for (int64_t g = 0; g < G; ++g) {
          load_queries(q + g * q_sh, t0, c);
          scores();
          gemm_t(M, Fp, F, D + c, X.data(), U.data(), false);
          write_out(y + g * y_sh, t0, c);
        }
        update_state(Sp.data(), Fp, D, F, phik.data(), vt);
        sync_state();
      }
    } else {
      for (int64_t t0 = 0; t0 < Lk; t0 += C) {
        load_keys(k, v, keep, t0, std::min(C, Lk - t0));
        update_state(Sp.data(), Fp, D, F, phik.data(), vt);
      }
      sync_state();
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t0 = 0; t0 < Lq; t0 += C) {
          const int64_t c = std::min(C, Lq - t0);
          load_queries(q + g * q_sh, t0, c);
          gemm_t(M, Fp, F, D, X.data(), U.data(), false);
          write_out(y + g * y_sh, t0, c);
        }
    }
    for (int64_t r = 0; r < D; ++r)
      for (int64_t f = 0; f < F; ++f) S[r * s_d + f * s_f] = Sp[r * Fp + f];
  }
};

}  // namespace sata

#pragma GCC pop_options
