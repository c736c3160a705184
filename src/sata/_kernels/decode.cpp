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

#include <cstdint>

#include "decode.h"
#include "kernels.h"

namespace {

using sata::Features;

// heads n0 .. n1-1 of a decode step, in one thread's buffers
template <typename T, typename TS>
void decode_heads(const DecodeArgs& a, int64_t n0, int64_t n1, const T* q, const T* k, const T* v,
                  const uint8_t* keep, const TS* S_in, TS* S_out, T* y, sata::HeadBuffers<T, TS>& buf) {
  const int64_t G = a.G, d = a.d, Ev = a.Ev, D = a.D, F = Ev + 1, rows = (n1 - n0) * (1 + G), ld = buf.ld;
  T* phi = buf.phi.get();
  T* vt = buf.vt.data();
  TS* u = buf.u.data();
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
    sata::sweep<T, TS>(S_in + n * F * D, S_out + n * F * D, D, F, G, pk, pq, ld, vt, u);
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
  using Buffers = sata::HeadBuffers<T, TS>;
  sata::share_heads(
      a.N, Buffers::kHeads, sata::work(a.N, 1, a.G, a.Ev + 1, a.D), a.work_per_thread,
      [&]() -> Buffers& { return sata::reused<Buffers>({a.D, a.G, a.Ev + 1, 0, 0, 0}, a.D, a.G, a.Ev + 1); },
      [&](Buffers& buf, int64_t n0, int64_t n1) { decode_heads<T, TS>(a, n0, n1, q, k, v, keep, S_in, S_out, y, buf); });
}

}  // namespace

extern "C" {

int64_t sata_kernel_abi() { return SATA_KERNEL_ABI; }

// sizes of the argument structs, which the Python side mirrors (0 decode, 1 prefill, 2 prefill tensors,
// 3 window decode, 4 window decode tensors, 5 window prefill, 6 window prefill tensors)
int64_t sata_struct_size(int64_t which) {
  const int64_t sizes[] = {sizeof(DecodeArgs), sizeof(PrefillArgs), sizeof(PrefillTensors), sizeof(WindowDecodeArgs),
                           sizeof(WindowDecodeTensors), sizeof(WindowPrefillArgs), sizeof(WindowPrefillTensors)};
  return which >= 0 && which < 7 ? sizes[which] : -1;
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
