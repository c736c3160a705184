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
constexpr int64_t RB = 6;    // most output rows (value columns) per register block of a product
constexpr int64_t DB = 8;    // feature rows per update block
constexpr int64_t VW = 16;   // lanes the update pads value columns to

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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
  for (int64_t p = 2; p < P; ++p) {
    T* block = out;
    for (int64_t j = 0; j < d; ++j) {
      const T* xj = x_t + j * C;
      const int64_t len = prefix_len[(p - 2) * d + j];
      for (int64_t r = 0; r < len; ++r) {
        const T* src = prev + r * C;
        const T wr = w[r];
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) out[i] = src[i] * xj[i] * wr;
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

// U[f][i] (+)= sum_r M[r][f] * X[r][i] for f < F: a [F x K] x [K x C] product, f in register blocks
template <typename T, int NB>
inline void gemm_block(const T* __restrict__ M, int64_t ldm, int64_t f0, int64_t K, const T* __restrict__ X,
                       T* __restrict__ U, bool accumulate) {
  T acc[NB][C];
  for (int64_t b = 0; b < NB; ++b)
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) acc[b][i] = accumulate ? U[(f0 + b) * C + i] : T(0);
  for (int64_t r = 0; r < K; ++r) {
    const T* x = X + r * C;
    const T* m = M + r * ldm + f0;
#pragma GCC unroll 6
    for (int64_t b = 0; b < NB; ++b) {
      const T mb = m[b];
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) acc[b][i] += mb * x[i];
    }
  }
  for (int64_t b = 0; b < NB; ++b) std::memcpy(U + (f0 + b) * C, acc[b], sizeof(T) * C);
}

template <typename T>
inline void gemm_t(const T* M, int64_t ldm, int64_t F, int64_t K, const T* X, T* U, bool accumulate) {
  // F rows in as few blocks as possible, of balanced sizes (F = 9: 5 + 4, not 6 + 3 or 4 + 4 + 1)
  const int64_t blocks = (F + RB - 1) / RB;
  for (int64_t b = 0, f0 = 0; b < blocks; ++b) {
    const int64_t n = (F - f0 + (blocks - b) - 1) / (blocks - b);
    switch (n) {
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

// Sp[D][f] += sum_i phi_t[D][i] * vt[i][f] for all f < Fp (Fp a multiple of VW); products summed
// over the chunk in T, added to the state in its own precision TS
template <typename T, typename TS, int NV>
inline void update_state_nv(TS* __restrict__ Sp, int64_t Fp, int64_t D, const T* __restrict__ phi_t,
                            const T* __restrict__ vt) {
  constexpr int64_t W = NV * VW;
  int64_t r0 = 0;
  for (; r0 + DB <= D; r0 += DB) {
    T acc[DB][W];
    for (int64_t b = 0; b < DB; ++b)
#pragma omp simd
      for (int64_t f = 0; f < W; ++f) acc[b][f] = T(0);
    for (int64_t i = 0; i < C; ++i) {
      const T* vi = vt + i * Fp;
#pragma GCC unroll 8
      for (int64_t b = 0; b < DB; ++b) {
        const T w = phi_t[(r0 + b) * C + i];
#pragma omp simd
        for (int64_t f = 0; f < W; ++f) acc[b][f] += w * vi[f];
      }
    }
    for (int64_t b = 0; b < DB; ++b) {
      TS* s = Sp + (r0 + b) * Fp;
#pragma omp simd
      for (int64_t f = 0; f < W; ++f) s[f] += TS(acc[b][f]);
    }
  }
  T acc[W];
  for (; r0 < D; ++r0) update_row(Sp, Fp, r0, W, phi_t, vt, acc);
}

template <typename T, typename TS>
inline void update_state(TS* Sp, int64_t Fp, int64_t D, const T* phi_t, const T* vt) {
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
  std::vector<TS> Sp;      // the head's state [D][Fp] in the state's precision (+ the v~ rows when TS == T)
  std::vector<T> Mf;       // when TS != T: [state in the compute precision; v~ rows]
  std::vector<T> kx, qx, phik, X, U;
  std::vector<const T*> key_rows;  // [C] key j of kx (element stride C)
  T* M;                    // Sp or Mf
  T* vt;                   // the v~ rows of M: [C][Fp]

  Head(int64_t G_, int64_t Lq_, int64_t Lk_, int64_t d_, int64_t Ev_, int64_t D_, int64_t P_, const int64_t* pl,
       const T* w, T sq_, T sk_)
      : G(G_), Lq(Lq_), Lk(Lk_), d(d_), Ev(Ev_), D(D_), P(P_), F(Ev_ + 1), Fp(round_up(Ev_ + 1, VW)),
        prefix_len(pl), weight(w), sq(sq_), sk(sk_),
        Sp((D_ + (std::is_same<T, TS>::value ? C : 0)) * round_up(Ev_ + 1, VW)),
        Mf(std::is_same<T, TS>::value ? 0 : (D_ + C) * round_up(Ev_ + 1, VW)), kx(d_ * C), qx(d_ * C), phik(D_ * C),
        X((D_ + C) * C), U(round_up(Ev_ + 1, VW) * C), key_rows(C) {
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
    std::fill(kx.begin(), kx.end(), T(0));
    std::fill(vt, vt + C * Fp, T(0));
    for (int64_t i = 0; i < c; ++i) {
      if (keep != nullptr && !keep[t0 + i]) continue;
      const T* kr = key_row(t0 + i);
      for (int64_t e = 0; e < d; ++e) kx[e * C + i] = (centre == nullptr ? kr[e] : kr[e] - centre[e]) * sk;
      const T* vr = value_row(t0 + i);
      T* row = vt + i * Fp;
      for (int64_t f = 0; f < Ev; ++f) row[f] = vr[f];
      row[Ev] = T(1);
    }
    features_t(kx.data(), d, P, prefix_len, weight, phik.data());
  }

  // the chunk's queries t0 .. t0 + c - 1, scaled, into qx [d][C] (the lanes past c zero)
  void load_qx(const T* q, int64_t t0, int64_t c) {
    std::fill(qx.begin(), qx.end(), T(0));
    for (int64_t i = 0; i < c; ++i) {
      const T* qr = q + (t0 + i) * q_sl;
      for (int64_t e = 0; e < d; ++e) qx[e * C + i] = qr[e] * sq;
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
    for (int64_t j = 0; j < C; ++j) {
      T* a = A + j * C;
      // Horner: T_P(s) = 1 + s (1 + s/2 (1 + ... (1 + s/(P-1))))
      T r[C];
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) r[i] = T(1);
      for (int64_t p = P - 1; p >= 1; --p) {
        const T inv = T(1) / T(p);
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) r[i] = T(1) + r[i] * a[i] * inv;
      }
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) a[i] = i >= j ? r[i] : T(0);
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
        update_state(Sp.data(), Fp, D, phik.data(), vt);
        sync_state();
      }
    } else {
      for (int64_t t0 = 0; t0 < Lk; t0 += C) {
        load_keys(k, v, keep, t0, std::min(C, Lk - t0));
        update_state(Sp.data(), Fp, D, phik.data(), vt);
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
