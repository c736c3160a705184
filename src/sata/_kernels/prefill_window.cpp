// Fused causal prefill of the window mode (MATH.md section 6), for the CPU (forward, no autograd).
//
// Per key/value head, on the extended stream (the state's W window keys, oldest first, then the
// call's L keys), chunk by chunk of C queries at call positions [t0, t0 + c):
//   far keys     stream positions e <= i: the state of every e < t0 read by phi(q_i), and the keys
//                e in [t0, i] through a causal c x c block (the plain prefill with the keys shifted by
//                W), both in the series around the query's centre: a_m(c'_i) scales the degree-m
//                feature rows of q_i and the terms of T(s) in the block (Horner per lane)
//   the centre   c' = mu' - alpha sd' of the far scores s' (keys minus the key centre), from the
//                degree 0..2 read-outs of the normaliser column plus the block; or c' = -delta
//                (delta = scale q.mu) without recentre, c = c' + delta (0 without recentre)
//   exact keys   the band i < e <= i + W (W diagonal rows per chunk: row m holds key i + 1 + m of each
//                lane i, read from a feature-major copy of the band kept across chunks) and the sinks
//                filled at positions <= n_tokens + i, through exp
//   y            (e^{m_x - m} num_x + beta e^{c - m} U[:Ev]) / (same with den_x, U[Ev]),
//                m = max(m_x, c) where the query has far keys (0 where that normaliser is not positive)
//   S            += phi(k_e - mu) [v_e, 1] for e in [t0, t0 + c): the chunk's far keys, after its queries
// Every step is the PyTorch path's (sata._paths.window) in the compute dtype T; the state accumulates
// in TS. Layouts: WindowPrefillTensors in kernels.h. Heads are shared out to the threads dynamically.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "prefill.h"
#include "window.h"

#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")  // as in prefill.h: the loops are written for 64-byte vectors

namespace {

using sata::C;
using sata::Vec;

template <typename T, typename TS>
struct WindowHead : sata::Head<T, TS> {
  using Base = sata::Head<T, TS>;
  static constexpr int64_t RB = 8;  // band rows per block of scores: independent sums (RB x d FMAs)
  static constexpr int64_t RING = 8;  // chunks per move of the band's rows (load_band)
  int64_t W, S, WB;                // window, sinks, W rounded up to blocks of band rows
  bool recentre;
  // (the T workspaces 64-byte aligned: their rows are whole vectors)
  std::vector<int64_t> off;        // [P + 1] feature offsets of the degrees
  std::vector<int64_t> deg;        // [D] degree of each feature row
  sata::avector<T> s;              // [C][C] far scores of the chunk's keys (rows) and queries (lanes)
  sata::avector<T> coef;           // [P][C] a_m(c'_i), or ones
  sata::avector<T> bcoef;          // [P][C] a_m(c'_i) / m!
  sata::avector<T> cen, nfar;      // [C] the far part's centre c_i and far keys of each query
  int64_t CW;                      // columns of the band: C + WB
  int64_t CR, b0 = 0;              // columns of the band's rows (CW and RING - 1 chunks), the band's first column
  sata::avector<T> bk, bv, badd;   // [d][CR], [Ev][CR], [CR] the chunk's band at columns b0 .. b0 + CW (load_band)
  sata::avector<T> ex;             // [WB + round_up(S, RJ)][C] exact scores: the band's rows, the sinks'
  std::vector<const T*> kp;        // [round_up(S, RJ)] the key row of each sink in use
  std::vector<const T*> val;       // [S] the value row of each sink in use
  std::vector<std::pair<int64_t, int64_t>> lane;  // [S] its lanes [lo, hi) in the chunk
  sata::avector<T> top, den;       // [C]
  sata::avector<T> num;            // [Ev][C]
  sata::avector<T> mus;            // [d] the key centre, scaled
  std::vector<const T*> krow, vrow;  // [CW] the key and value rows of the band's new columns
  sata::avector<T> zeros;          // [max(d, Ev)] the row of a column without a key

  WindowHead(const WindowPrefillArgs& w)
      : Base(w.base.G, 0, 0, w.base.d, w.base.Ev, w.base.D, w.base.P, w.base.prefix_len,
             static_cast<const T*>(w.base.weight), T(w.base.sq), T(w.base.sk)),
        W(w.W), S(w.S), WB(sata::round_up(w.W, RB)), recentre(w.recentre != 0), off(w.base.P + 1, 0), deg(w.base.D),
        s(C * C), coef(w.base.P * C), bcoef(w.base.P * C), cen(C), nfar(C), CW(C + WB), CR(CW + (RING - 1) * C),
        bk(w.base.d * CR), bv(w.base.Ev * CR), badd(CR), ex((WB + sata::round_up(w.S, sata::RJ)) * C),
        kp(sata::round_up(w.S, sata::RJ)), val(w.S), lane(w.S), top(C), den(C), num(w.base.Ev * C), mus(w.base.d),
        krow(CW), vrow(CW), zeros(std::max(w.base.d, w.base.Ev)) {
    std::fill(coef.begin(), coef.end(), T(1));  // the coefficients of a plan without a centre: never rewritten
    const int64_t P = this->P, d = this->d;
    for (int64_t p = 0; p < P; ++p) {
      int64_t size = p == 0 ? 1 : d;
      if (p >= 2) {
        size = 0;
        for (int64_t j = 0; j < d; ++j) size += this->prefix_len[(p - 2) * d + j];
      }
      off[p + 1] = off[p] + size;
      for (int64_t r = off[p]; r < off[p + 1]; ++r) deg[r] = p;
    }
  }

  // the far part of the chunk for one query head: centres and coefficients, the query rows of X scaled
  // per degree, the causal block as rows D.. of X, then U = M^T X
  void far_part(int64_t c, const T* mu, T alpha) {
    const int64_t d = this->d, D = this->D, P = this->P, Fp = this->Fp, Ev = this->Ev;
    const T* qx = this->qx.data();
    T* X = this->X.data();
    const T* M = this->M;
    const T* vt = this->vt;
    sata::dots(this->key_rows.data(), C, C, qx, d, s.data());  // s[j][i] = k'_j . q_i, scaled (0 for keys j >= c)
    // far keys of each query: the state's count and the chunk's flagged keys at or before it
    T count = T(0);
    for (int64_t i = 0; i < C; ++i) {
      if (i < c) count += vt[i * Fp + Ev];
      nfar[i] = M[Ev] + count;
    }
    const bool scaled = recentre || mu != nullptr;  // else every a_m is 1
    // lane by lane (each lane a query): delta, the centre c' of the far scores s' and a_m(c')
    T delta[C], shifted[C];
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) delta[i] = T(0);
    if (mu != nullptr)
      for (int64_t e = 0; e < d; ++e) {
        const T* qe = qx + e * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) delta[i] += qe[i] * mus[e];
      }
    if (recentre) {
      // (N, sum s', sum s'^2 / 2) over the far keys: the state's degree 1 and 2 read-outs of the normaliser
      // column, then the chunk's keys at or before the query (the second moment only for a centre below the mean)
      const bool second = P >= 3 && alpha != T(0);
      T m1[C], m2[C];
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) m1[i] = m2[i] = T(0);
      for (int64_t r = off[1]; r < off[std::min<int64_t>(P, second ? 3 : 2)]; ++r) {
        const T z = M[r * Fp + Ev];
        T* m = r < off[2] ? m1 : m2;
        const T* x = X + r * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) m[i] += x[i] * z;
      }
      for (int64_t j = 0; j < c; ++j) {
        const T wj = vt[j * Fp + Ev];
        if (wj == T(0)) continue;
        const T* sj = s.data() + j * C;
        if (second) {
#pragma omp simd
          for (int64_t i = 0; i < C; ++i) {
            const T a = i >= j ? wj * sj[i] : T(0);
            m1[i] += a;
            m2[i] += a * sj[i] * T(0.5);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < C; ++i) m1[i] += i >= j ? wj * sj[i] : T(0);
        }
      }
      for (int64_t i = 0; i < C; ++i) {
        shifted[i] = sata::centre<T>(nfar[i], m1[i], second ? m2[i] : T(0), alpha);
        cen[i] = shifted[i] + delta[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) {
        shifted[i] = -delta[i];
        cen[i] = T(0);
      }
    }
    if (scaled) {  // a_m(c) = sum_{n < P-m} (-c)^n / n! (sata::coefficients, lane by lane)
      T term[C], sum[C];
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) term[i] = T(1), sum[i] = T(0);
      for (int64_t n = 0; n < P; ++n) {
        const T inv = n ? T(1) / T(n) : T(1);
        T* cm = coef.data() + (P - 1 - n) * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) {
          if (n) term[i] = term[i] * (-shifted[i]) * inv;
          sum[i] += term[i];
          cm[i] = sum[i];
        }
      }
    }
    if (scaled)  // a_{P-1} = 1: the last degree, the largest block, stays as it is
      for (int64_t r = 0; r < off[P - 1]; ++r) {
        const T* cm = coef.data() + deg[r] * C;
        T* x = X + r * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) x[i] *= cm[i];
      }
    T* A = X + D * C;  // A[j][i] = sum_m a_m(c'_i) s^m / m! for j <= i, by Horner per lane (in registers)
    {
      using VV = Vec<T>;
      using V = typename VV::type;
      typedef typename sata::Bits<T>::type Lane;
      typedef Lane I __attribute__((vector_size(sizeof(V))));
      constexpr int64_t L = VV::W;
      I iota;
      for (int64_t l = 0; l < L; ++l) iota[l] = l;
      for (int64_t m = 0; m < P; ++m) {  // b_m = a_m / m!: one multiply-add per term below
        const T inv = this->inv_fact[m];
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) bcoef[m * C + i] = coef[m * C + i] * inv;
      }
      for (int64_t i = 0; i < C; i += L) {
        const I at = iota + Lane(i);
        for (int64_t j = 0; j < C; ++j) {
          const V sj = VV::load(s.data() + j * C + i);
          V r = VV::load(bcoef.data() + (P - 1) * C + i);
          for (int64_t m = P - 2; m >= 0; --m) r = VV::load(bcoef.data() + m * C + i) + r * sj;
          VV::store(A + j * C + i, j < c ? (at >= Lane(j) ? r : V{}) : V{});
        }
      }
    }
    sata::gemm_t(M, Fp, this->F, D + c, X, this->U.data(), false);
  }

  // the chunk's band, once for all its query heads: column b0 + u of bk [d][CR] (keys scaled), bv [Ev][CR] and
  // badd [CR] holds stream position t0 + 1 + u (u < CW), badd 0 for a kept key and -inf for none (or beyond the
  // stream's end n); query i reads columns i .. i + W - 1. The band slides C columns a chunk (chunks come in
  // order) over rows of RING chunks: the columns that stay are moved once per RING - 1 chunks, not every chunk
  template <typename KeyRow, typename ValueRow>
  void load_band(int64_t t0, int64_t n, const KeyRow& k, const ValueRow& v, const uint8_t* flag) {
    const int64_t d = this->d, Ev = this->Ev;
    const T sk = this->sk;
    int64_t u0 = 0;
    if (t0 == 0) {
      b0 = 0;
    } else if (b0 + C + CW <= CR) {  // columns C .. CW - 1 become 0 .. CW - C - 1 where they are
      b0 += C;
      u0 = CW - C;
    } else {                          // the end of the rows: the columns that stay move to their start
      u0 = CW - C;
      for (T* row = bk.data(); row < bk.data() + d * CR; row += CR) std::memmove(row, row + b0 + C, sizeof(T) * u0);
      for (T* row = bv.data(); row < bv.data() + Ev * CR; row += CR) std::memmove(row, row + b0 + C, sizeof(T) * u0);
      std::memmove(badd.data(), badd.data() + b0 + C, sizeof(T) * u0);
      b0 = 0;
    }
    // the new columns' rows (a row of zeros where no key is kept), then feature-major: from one block of
    // consecutive rows when they are (every key kept, in one tensor: the steady state) by a transposition of
    // the head size known to the compiler, else row pointer by row pointer
    const int64_t nu = CW - u0;
    bool dense = true;
    for (int64_t u = u0; u < CW; ++u) {
      const int64_t e = t0 + 1 + u;
      const bool kept = e < n && flag[e];
      krow[u - u0] = kept ? k(e) : zeros.data();
      vrow[u - u0] = kept ? v(e) : zeros.data();
      badd[b0 + u] = kept ? T(0) : -std::numeric_limits<T>::infinity();
      dense &= kept;
    }
    const auto consecutive = [nu](const std::vector<const T*>& rows, int64_t width) {
      return reinterpret_cast<uintptr_t>(rows[nu - 1]) - reinterpret_cast<uintptr_t>(rows[0]) ==
             uintptr_t(nu - 1) * uintptr_t(width) * sizeof(T);
    };
    T* kout = bk.data() + b0 + u0;
    T* vout = bv.data() + b0 + u0;
    if (dense && consecutive(krow, d) && consecutive(vrow, Ev)) {
      transpose(krow[0], nu, d, sk, kout);
      transpose(vrow[0], nu, Ev, T(1), vout);
      return;
    }
    for (int64_t x = 0; x < d; ++x) {
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) kout[x * CR + u] = krow[u][x] * sk;
    }
    for (int64_t f = 0; f < Ev; ++f) {
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) vout[f * CR + u] = vrow[u][f];
    }
  }

  // out[x][u] = a * rows[u][x] (out rows CR apart) for n consecutive rows of the given width: with the common
  // widths known, the compiler reads the rows whole and interleaves them in registers
  void transpose(const T* rows, int64_t n, int64_t width, T a, T* out) const {
    const int64_t ld = CR;
    const auto fixed = [&](auto w) {
      constexpr int64_t Wd = decltype(w)::value;
#pragma omp simd
      for (int64_t u = 0; u < n; ++u)
#pragma GCC unroll 64
        for (int64_t x = 0; x < Wd; ++x) out[x * ld + u] = rows[u * Wd + x] * a;
    };
    switch (width) {
      case 8: return fixed(std::integral_constant<int64_t, 8>{});
      case 16: return fixed(std::integral_constant<int64_t, 16>{});
      default:
        for (int64_t x = 0; x < width; ++x) {
#pragma omp simd
          for (int64_t u = 0; u < n; ++u) out[x * ld + u] = rows[u * width + x] * a;
        }
    }
  }

  // the exact part of the chunk's queries: the band of stream positions (i, i + W] and the filled sinks;
  // top, den and num (unnormalised, around top). The band is diagonal: row m of scores holds key i + 1 + m of
  // each lane i (shifted loads of bk, no lane wasted), RB rows at once (independent sums hide the latency of
  // each); the sinks are rows of one key each, on the lanes [lo, hi) of the queries that see them
  void exact_part(int64_t t0, int64_t c, const T* sink_k, const T* sink_v, const int64_t* sink_pos, int64_t n_tokens) {
    using VV = Vec<T>;
    using V = typename VV::type;
    constexpr int64_t L = VV::W, NB = C / L, RJ = sata::RJ;
    static_assert(C % L == 0, "a chunk is whole vectors");
    const int64_t d = this->d, Ev = this->Ev;
    const T* qx = this->qx.data();
    const V ninf = V{} - std::numeric_limits<T>::infinity();
    // the band's scores, tile by tile of R columns u0 .. u0 + R - 1: a tile holds rows m = u - b L of each block b
    // of lanes b L .. (b + 1) L with m in [0, W), and each shifted load of its keys serves NG of those blocks
    constexpr int64_t R = L < RB ? L : RB, NG = sata::VREGS >= 2 * RB + 4 ? 2 : 1;
    V mx[NB];  // the largest score of each lane
    for (int64_t b = 0; b < NB; ++b) mx[b] = ninf;
    for (int64_t u0 = 0; u0 < (NB - 1) * L + W; u0 += R) {
      const int64_t lo = u0 < W ? 0 : (u0 - W) / L + 1, hi = std::min<int64_t>(NB - 1, u0 / L);  // blocks
      for (int64_t b = lo; b <= hi; b += NG) {
        if (NG > 1 && b < hi)
          band_tile<R, NG>(u0, b, mx);
        else
          band_tile<R, 1>(u0, b, mx);
      }
    }
    int64_t ns = 0;  // sinks in use: a sink at stream position p is exact for queries at n_tokens + t0 + i >= p
    for (int64_t j = 0; j < S; ++j) {
      const int64_t lo = std::max<int64_t>(sink_pos[j] - n_tokens - t0, 0);
      if (sink_pos[j] < 0 || lo >= c) continue;
      kp[ns] = sink_k + j * d;
      val[ns] = sink_v + j * Ev;
      lane[ns++] = {lo, c};
    }
    if (ns > 0) {
      for (int64_t r = ns; r < sata::round_up(ns, RJ); ++r) kp[r] = kp[ns - 1];  // the last block's padding
      T* sx = ex.data() + WB * C;
      sata::dots(kp.data(), 1, ns, qx, d, sx);  // unscaled keys: sk applied below
      typedef typename sata::Bits<T>::type Lane;
      typedef Lane I __attribute__((vector_size(sizeof(V))));
      I iota;
      for (int64_t l = 0; l < L; ++l) iota[l] = l;
      for (int64_t r = 0; r < ns; ++r) {  // each sink's lanes kept (scaled), -inf on the others
        const Lane lo = Lane(lane[r].first), hi = Lane(lane[r].second);
        for (int64_t b = 0; b < NB; ++b) {
          const I at = iota + Lane(b * L);
          const V x = (at >= lo) & (at < hi) ? VV::load(sx + r * C + b * L) * this->sk : ninf;  // [L]
          VV::store(sx + r * C + b * L, x);
          mx[b] = x > mx[b] ? x : mx[b];
        }
      }
    }
    V safe[NB];
    for (int64_t b = 0; b < NB; ++b) {
      VV::store(top.data() + b * L, mx[b]);
      safe[b] = mx[b] - mx[b] == T(0) ? mx[b] : V{};  // 0 where not finite (no exact key)
    }
    // weights e^{s - max}, their sum and the weighted values, vector by vector: two blocks at once where their
    // sums fit in registers beside each other (a shifted load of values then serves both)
    constexpr bool two = NB >= 2 && sata::VREGS >= 32;
    for (int64_t b = 0; b < NB;) {
      const bool pair = two && b + 1 < NB;
      switch (Ev) {
        case 8: pair ? weigh<8, 2>(ns, b, safe + b) : weigh<8, 1>(ns, b, safe + b); break;
        case 16: weigh<16, 1>(ns, b, safe + b); break;
        case 32: weigh<32, 1>(ns, b, safe + b); break;
        case 64: weigh<64, 1>(ns, b, safe + b); break;
        default: weigh<0, 1>(ns, b, safe + b);
      }
      b += pair && Ev == 8 ? 2 : 1;
    }
  }

  // the scores of band columns u0 .. u0 + R - 1 for the NG blocks of lanes from b: rows u - b' L of ex for each
  // block b' (independent sums: R x NG FMAs per feature), their maxima into mx
  template <int64_t R, int64_t NG>
  void band_tile(int64_t u0, int64_t b, typename Vec<T>::type* mx) {
    using VV = Vec<T>;
    using V = typename VV::type;
    constexpr int64_t L = VV::W;
    const T* qx = this->qx.data();
    V acc[NG][R];
    for (int64_t r = 0; r < R; ++r) {
      const V add = VV::load(badd.data() + b0 + u0 + r);  // 0 or -inf: the column's key
      for (int64_t g = 0; g < NG; ++g) acc[g][r] = add;
    }
    for (int64_t x = 0; x < this->d; ++x) {
      V qe[NG];
      for (int64_t g = 0; g < NG; ++g) qe[g] = VV::load(qx + x * C + (b + g) * L);
      const T* kr = bk.data() + x * CR + b0 + u0;
      for (int64_t r = 0; r < R; ++r) {
        const V kv = VV::load(kr + r);  // [L] key u0 + r + l of lane l
        for (int64_t g = 0; g < NG; ++g) acc[g][r] += kv * qe[g];
      }
    }
    for (int64_t g = 0; g < NG; ++g) {
      const int64_t m0 = u0 - (b + g) * L;  // in [0, W): rows m0 .. m0 + R - 1 (those from W pad the last block)
      for (int64_t r = 0; r < R; ++r) {
        VV::store(ex.data() + (m0 + r) * C + (b + g) * L, acc[g][r]);
        if (m0 + r < W) mx[b + g] = acc[g][r] > mx[b + g] ? acc[g][r] : mx[b + g];
      }
    }
  }

  // den and num on lanes b L .. (b + NG) L from the band's W rows and the ns sinks' rows: with the value size EV
  // known the sums stay in registers across the rows (0: any size, summed in memory). Two blocks (NG = 2) share
  // the band's value columns L .. W - 1 of the first (rows m of the first, m - L of the second): one load each
  template <int EV, int NG>
  void weigh(int64_t ns, int64_t b, const typename Vec<T>::type* safe) {
    using VV = Vec<T>;
    using V = typename VV::type;
    constexpr int64_t L = VV::W;
    static_assert(NG == 1 || EV != 0, "two blocks keep their sums in registers");
    const int64_t Ev = EV ? EV : this->Ev, i = b * L;
    V dn[NG], acc[NG][EV ? EV : 1];
    for (int g = 0; g < NG; ++g) {
      dn[g] = V{};
      for (int64_t f = 0; f < (EV ? EV : 1); ++f) acc[g][f] = V{};
    }
    if (!EV)
      for (int64_t f = 0; f < Ev; ++f) VV::store(num.data() + f * C + i, V{});
    // block g's weight of band row m, and p times the value rows value(f) [L] added to block g's sums
    const auto weight = [&](int g, int64_t m) {
      return sata::vexp_le0<T>(VV::load(ex.data() + m * C + i + g * L) - safe[g]);
    };
    const auto add = [&](int g, V p, const auto& value) {
      dn[g] += p;
      if constexpr (EV != 0) {
#pragma GCC unroll 64
        for (int64_t f = 0; f < EV; ++f) acc[g][f] += p * value(f);
      } else {
        for (int64_t f = 0; f < Ev; ++f)
          VV::store(num.data() + f * C + i, VV::load(num.data() + f * C + i) + p * value(f));
      }
    };
    const auto column = [&](int64_t u) {  // the values of band column i + u + l on lane l
      const T* vr = bv.data() + b0 + i + u;
      return [vr, this](int64_t f) { return VV::load(vr + f * CR); };
    };
    if constexpr (NG == 1) {
      for (int64_t m = 0; m < W; ++m) add(0, weight(0, m), column(m));  // lane i's key at column i + m
    } else {
      for (int64_t m = 0; m < std::min(L, W); ++m) add(0, weight(0, m), column(m));
      for (int64_t m = L; m < W; ++m) {
        const V p0 = weight(0, m), p1 = weight(1, m - L);
        const auto value = column(m);
        dn[0] += p0;
        dn[1] += p1;
#pragma GCC unroll 64
        for (int64_t f = 0; f < EV; ++f) {
          const V x = value(f);
          acc[0][f] += p0 * x;
          acc[1][f] += p1 * x;
        }
      }
      for (int64_t m = std::max<int64_t>(W - L, 0); m < W; ++m) add(1, weight(1, m), column(L + m));
    }
    for (int g = 0; g < NG; ++g) {
      const int64_t ig = i + g * L;
      for (int64_t r = 0; r < ns; ++r) {  // the sinks
        if (ig + L <= lane[r].first) continue;  // no lane of this sink here
        const T* vr = val[r];
        add(g, sata::vexp_le0<T>(VV::load(ex.data() + (WB + r) * C + ig) - safe[g]), [&](int64_t f) { return vr[f] + V{}; });
      }
      if constexpr (EV != 0)
        for (int64_t f = 0; f < EV; ++f) VV::store(num.data() + f * C + ig, acc[g][f]);
      VV::store(den.data() + ig, dn[g]);
    }
  }

  // both parts scaled to their common maximum m = max(top, c) (top alone for a query without far keys, or with
  // beta 0), summed into U ([Ev + 1][C], lane by lane), then y rows t0 .. t0 + c - 1 = U[:Ev] / U[Ev]
  // (Head::write_out)
  void combine(T* y, int64_t t0, int64_t c, T beta) {
    using VV = Vec<T>;
    using V = typename VV::type;
    constexpr int64_t L = VV::W;
    const int64_t Ev = this->Ev;
    T* U = this->U.data();
    // beta 0: no far part, the maximum from the exact part alone (no count of far keys exceeds inf)
    const T some_far = beta != T(0) ? T(0) : std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < C; i += L) {
      const V mx = VV::load(top.data() + i), cc = VV::load(cen.data() + i);
      const auto far = VV::load(nfar.data() + i) > some_far;
      V m = far & (cc > mx) ? cc : mx;
      m = m - m == T(0) ? m : V{};                        // not finite (no key at all): 0
      const V e_exact = sata::vexp<T>(mx - m);           // 0 without exact keys
      const V e_far = far ? beta * sata::vexp<T>(cc - m) : V{};
      for (int64_t f = 0; f < Ev; ++f)
        VV::store(U + f * C + i, e_exact * VV::load(num.data() + f * C + i) + e_far * VV::load(U + f * C + i));
      VV::store(U + Ev * C + i, e_exact * VV::load(den.data() + i) + e_far * VV::load(U + Ev * C + i));
    }
    this->write_out(y, t0, c);
  }

  void run(const WindowPrefillTensors& t, int64_t n, int64_t Hkv) {
    const int64_t G = this->G, d = this->d, Ev = this->Ev, D = this->D, F = this->F, Fp = this->Fp, L = t.L;
    const int64_t b = n / Hkv, h0 = (n % Hkv) * G;
    const T* q = static_cast<const T*>(t.q) + n * G * L * d;
    const T* kw = static_cast<const T*>(t.k_win) + n * W * d;
    const T* vw = static_cast<const T*>(t.v_win) + n * W * Ev;
    const T* kc = static_cast<const T*>(t.k) + n * L * d;
    const T* vc = static_cast<const T*>(t.v) + n * L * Ev;
    // the far part's queries and keys (a converted hybrid's own; else the same as the exact part's)
    const T* qf = t.q_far == nullptr ? q : static_cast<const T*>(t.q_far) + n * G * L * d;
    const T* kf = t.k_far == nullptr ? kc : static_cast<const T*>(t.k_far) + n * L * d;
    // rows of the extended stream: the window, then the call
    const auto k = [&](int64_t e) { return e < W ? kw + e * d : kc + (e - W) * d; };
    const auto k_far = [&](int64_t e) { return e < W ? kw + e * d : kf + (e - W) * d; };
    const auto v = [&](int64_t e) { return e < W ? vw + e * Ev : vc + (e - W) * Ev; };
    const uint8_t* flag = t.flag + b * (W + L);
    const T* sink_k = static_cast<const T*>(t.sink_k) + n * S * d;
    const T* sink_v = static_cast<const T*>(t.sink_v) + n * S * Ev;
    const int64_t* sink_pos = t.sink_pos + b * S;
    const T* mu = t.key_centre == nullptr ? nullptr : static_cast<const T*>(t.key_centre) + n * d;
    const T *alpha = static_cast<const T*>(t.alpha), *beta = static_cast<const T*>(t.beta);
    TS* Sg = static_cast<TS*>(t.S) + n * F * D;
    T* y = static_cast<T*>(t.y) + n * G * L * Ev;
    if (mu != nullptr)
      for (int64_t e = 0; e < d; ++e) mus[e] = mu[e] * this->sk;
    this->q_sl = d;
    this->y_sl = Ev;
    std::fill(this->Sp.begin(), this->Sp.end(), TS(0));
    for (int64_t r = 0; r < D; ++r)
      for (int64_t f = 0; f < F; ++f) this->Sp[r * Fp + f] = Sg[f * D + r];
    this->sync_state();
    for (int64_t t0 = 0; t0 < L; t0 += C) {
      const int64_t c = std::min(C, L - t0);
      this->load_rows(k_far, v, flag, t0, c, mu);  // the far keys of the chunk: stream positions t0 .. t0 + c - 1
      load_band(t0, W + L, k, v, flag);
      for (int64_t g = 0; g < G; ++g) {
        this->load_queries(qf + g * L * d, t0, c);
        far_part(c, mu, recentre ? alpha[h0 + g] : T(0));
        if (qf != q) this->load_qx(q + g * L * d, t0, c);  // the exact part's own queries (no features needed)
        exact_part(t0, c, sink_k, sink_v, sink_pos, t.n_tokens);
        combine(y + g * L * Ev, t0, c, beta[h0 + g]);
      }
      sata::update_state(this->Sp.data(), Fp, D, this->F, this->phik.data(), this->vt);
      this->sync_state();
    }
    for (int64_t r = 0; r < D; ++r)
      for (int64_t f = 0; f < F; ++f) Sg[f * D + r] = this->Sp[r * Fp + f];
  }
};

template <typename T, typename TS>
void prefill_window(const WindowPrefillArgs& w, const WindowPrefillTensors& t) {
  const PrefillArgs& a = w.base;
  const int64_t N = t.B * a.Hkv;
  const double flops = sata::work(N, t.L, a.G * t.L, a.Ev + 1, a.D) + 2.0 * N * a.G * t.L * (w.W + w.S) * (a.d + a.Ev);
  const int64_t nt = sata::threads_for(N, flops, a.work_per_thread);
  std::atomic<int64_t> next{0};
  sata::on_threads(nt, [&] {
    WindowHead<T, TS> head(w);
    for (int64_t n = next++; n < N; n = next++) head.run(t, n, a.Hkv);
  });
}

}  // namespace

#pragma GCC pop_options

extern "C" {

// returns 0, or 1 when the call failed (out of memory): the outputs and the state are then undefined
#define SATA_PREFILL_WINDOW(NAME, T, TS)                                                  \
  int NAME(const WindowPrefillArgs* a, const WindowPrefillTensors* t) {                 \
    return sata::guarded([&] { prefill_window<T, TS>(*a, *t); });                       \
  }

SATA_PREFILL_WINDOW(sata_prefill_window_f32, float, float)
SATA_PREFILL_WINDOW(sata_prefill_window_f32s64, float, double)
SATA_PREFILL_WINDOW(sata_prefill_window_f64, double, double)

}  // extern "C"
