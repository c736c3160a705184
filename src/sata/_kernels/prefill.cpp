// Fused chunked prefill of symmetry-aware Taylor attention, for the CPU (forward, no autograd).
//
// Per key/value head, chunk by chunk of C tokens (MATH.md section 3):
//   phi(K_t), phi(Q_t)    features, feature-major [D][C]: every hierarchy step is a row
//                         times a row, vectorised over the tokens of the chunk
//   U  = S^T phi(Q_t)     read the state of all earlier chunks            [F][C]
//   U += [V, 1]^T A       A = T_P(scale K_t Q_t^T), causal within the chunk
//   y  = U[:Ev] / U[Ev]   (0 where the normaliser is not positive)
//   S += phi(K_t) [V, 1]  update                                          [D][F]
// Non-causal: every key chunk updates S first, then every query chunk reads it.
// The state of a head lives in a padded workspace [D][Fp] for the whole call, so the
// two products above are small register-blocked GEMMs over data that stays in cache.
//
// Heads are shared out to the threads dynamically (a thread the scheduler delays takes fewer).
//
// Layouts (PrefillTensors in kernels.h): q [B, Hkv * G, Lq, d], k [B, Hkv, Lk, d], v [B, Hkv, Lk, Ev],
// y [B, Hkv * G, Lq, Ev], each with any strides but a contiguous last dimension; keep [B, Lk] uint8
// (0 = ignore key) or null; state element (b, h, D, f) at S[b * s_b + h * s_h + D * s_d + f * s_f],
// updated in place.

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels.h"
#include "prefill.h"

namespace {

using sata::Head;

template <typename T, typename TS>
void prefill(const PrefillArgs& a, const PrefillTensors& t) {
  const int64_t Hkv = a.Hkv, G = a.G, N = t.B * Hkv, Lk = t.Lk;
  const T* q = static_cast<const T*>(t.q.data);
  const T* k = static_cast<const T*>(t.k.data);
  const T* v = static_cast<const T*>(t.v.data);
  T* y = static_cast<T*>(t.y.data);
  TS* S = static_cast<TS*>(t.S);
  const int64_t nt = sata::threads_for(N, sata::work(N, Lk, G * t.Lq, a.Ev + 1, a.D), a.work_per_thread);
  std::atomic<int64_t> next{0};
  sata::on_threads(nt, [&] {
    Head<T, TS> head(G, t.Lq, Lk, a.d, a.Ev, a.D, a.P, a.prefix_len, static_cast<const T*>(a.weight), T(a.sq),
                     T(a.sk));
    head.k_sl = t.k.l;
    head.v_sl = t.v.l;
    head.q_sl = t.q.l;
    head.q_sh = t.q.h;
    head.y_sl = t.y.l;
    head.y_sh = t.y.h;
    for (int64_t n = next++; n < N; n = next++) {
      const int64_t b = n / Hkv, h = n % Hkv;
      head.run(q + b * t.q.b + h * G * t.q.h, k + b * t.k.b + h * t.k.h, v + b * t.v.b + h * t.v.h,
               t.keep == nullptr ? nullptr : t.keep + b * Lk, S + b * t.s_b + h * t.s_h, t.s_d, t.s_f,
               y + b * t.y.b + h * G * t.y.h, a.causal != 0);
    }
  });
}

}  // namespace

extern "C" {

// returns 0, or 1 when the call failed (out of memory): the outputs and the state are then undefined
#define SATA_PREFILL(NAME, T, TS)                                            \
  int NAME(const PrefillArgs* a, const PrefillTensors* t) {                \
    return sata::guarded([&] { prefill<T, TS>(*a, *t); });                 \
  }

SATA_PREFILL(sata_prefill_f32, float, float)
SATA_PREFILL(sata_prefill_f32s64, float, double)
SATA_PREFILL(sata_prefill_f64, double, double)

}  // extern "C"
