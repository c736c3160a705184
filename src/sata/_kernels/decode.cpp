// Fused decode step of symmetry-aware Taylor attention, for the CPU.
//
// For every key/value head n (and its G query heads), in one pass over the state:
//   phi(k), phi(q_g)            packed features through the colex hierarchy
//   S'[f, :] = S[f, :] + v~[f] * phi(k)            v~ = [v, 1], zeroed for a masked key
//   u[g, f]  = <phi(q_g), S'[f, :]>
//   y[g, :]  = u[g, :Ev] / u[g, Ev]                (0 where the normaliser is not positive)
// The state is read once and written once (in place when S_out == S_in), which is the
// memory-traffic floor of a decode step. Built on first use by sata._kernels (g++ -O3 -fopenmp).
//
// Layouts (all contiguous): q [N, G, d], k [N, d], v [N, Ev], keep [N] or null,
// S_in / S_out [N, F, D] with F = Ev + 1 (the state's kv[..., D, F] stored D-contiguous), in the
// state's precision TS (float, or double for long float32 streams),
// y [N, G, Ev]. prefix_len [(P-2) * d] = C(j+p-1, p-1) for p >= 2 and weight [D-1-d] (the step
// weights of degrees >= 2, in feature order) describe the colex hierarchy.

#include <cstdint>
#include <vector>

namespace {

// phi(x): the degree-p monomials whose largest index is j are the first C(j+p-1, p-1)
// degree-(p-1) monomials (a contiguous prefix) times x_j, each with its step weight.
template <typename T>
inline void features(const T* x, T s, int64_t d, int64_t P, const int64_t* prefix_len, const T* weight, T* phi) {
  phi[0] = T(1);
  if (P == 1) return;
  T* xs = phi + 1;
  for (int64_t j = 0; j < d; ++j) xs[j] = x[j] * s;
  const T* prev = xs;
  T* out = xs + d;
  const T* w = weight;
  for (int64_t p = 2; p < P; ++p) {
    T* block = out;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t len = prefix_len[(p - 2) * d + j];
      const T xj = xs[j];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = prev[i] * xj * w[i];
      out += len;
      w += len;
    }
    prev = block;
  }
}

template <typename T, typename TS>
void decode(int64_t N, int64_t G, int64_t d, int64_t Ev, int64_t D, int64_t P, const T* q, const T* k, const T* v,
            const uint8_t* keep, const TS* S_in, TS* S_out, T* y, const int64_t* prefix_len, const T* weight, T sq,
            T sk, int n_threads) {
  const int64_t F = Ev + 1;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1 && N > 1)
  {
    std::vector<T> phik(D), phiq(G * D);
    std::vector<TS> u(G * F);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const bool use = keep == nullptr || keep[n];
      features(k + n * d, sk, d, P, prefix_len, weight, phik.data());
      for (int64_t g = 0; g < G; ++g)
        features(q + (n * G + g) * d, sq, d, P, prefix_len, weight, phiq.data() + g * D);
      const T* vn = v + n * Ev;
      const T* pk = phik.data();
      for (int64_t f = 0; f < F; ++f) {
        const T vf = use ? (f < Ev ? vn[f] : T(1)) : T(0);
        const TS* src = S_in + (n * F + f) * D;
        TS* dst = S_out + (n * F + f) * D;
        if (G == 1) {  // update and read in one sweep
          const T* pq = phiq.data();
          TS acc = TS(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < D; ++i) {
            const TS s_new = src[i] + TS(vf * pk[i]);
            dst[i] = s_new;
            acc += TS(pq[i]) * s_new;
          }
          u[f] = acc;
        } else {
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) dst[i] = src[i] + TS(vf * pk[i]);
          for (int64_t g = 0; g < G; ++g) {
            const T* pq = phiq.data() + g * D;
            TS acc = TS(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < D; ++i) acc += TS(pq[i]) * dst[i];
            u[g * F + f] = acc;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const TS z = u[g * F + Ev];
        T* yg = y + (n * G + g) * Ev;
        for (int64_t f = 0; f < Ev; ++f) yg[f] = z > TS(0) ? T(u[g * F + f] / z) : T(0);
      }
    }
  }
}

}  // namespace

extern "C" {

int sata_kernel_version() { return 3; }

#define SATA_DECODE(NAME, T, TS)                                                                                     \
  void NAME(int64_t N, int64_t G, int64_t d, int64_t Ev, int64_t D, int64_t P, const T* q, const T* k, const T* v,  \
            const uint8_t* keep, const TS* S_in, TS* S_out, T* y, const int64_t* prefix_len, const T* weight,        \
            double sq, double sk, int n_threads) {                                                                   \
    decode<T, TS>(N, G, d, Ev, D, P, q, k, v, keep, S_in, S_out, y, prefix_len, weight, T(sq), T(sk), n_threads);  \
  }

SATA_DECODE(sata_decode_f32, float, float)
SATA_DECODE(sata_decode_f32s64, float, double)
SATA_DECODE(sata_decode_f64, double, double)

}  // extern "C"
