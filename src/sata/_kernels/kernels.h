// What the fused kernels share: the argument structs of the C interface, the ABI number the
// Python side checks on load, the SIMD vector type and the thread policy.
//
// Threads come from torch's own intra-op pool (at::parallel_for, at::get_num_threads): one pool
// in the process, sized by torch.set_num_threads. A call fans out only when its work pays for
// the threads: waking a worker costs microseconds on an idle machine, and on a busy one a worker
// the scheduler has not run yet stalls the whole call for a time slice (milliseconds), so a
// decode step or a short prefill segment runs on the calling thread alone.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

// Bump on any change to the structs or the entry points: the Python side compares it (and the
// struct sizes) with its own on load and rebuilds a cached library that disagrees.
#define SATA_KERNEL_ABI 11

extern "C" {

// the constants of a decode plan, bound once (fewer arguments per call: each costs in ctypes)
struct DecodeArgs {
  int64_t N, G, d, Ev, D, P;     // heads (batch x kv heads), query heads per kv head, sizes, terms
  const int64_t* prefix_len;     // [(P-2) d]
  const void* weight;            // [D-1-d + padding] in the compute dtype
  double sq, sk;                 // input scales of queries and keys
  double work_per_thread;        // fan out only beyond this many flops per thread
};

// the constants of a prefill plan
struct PrefillArgs {
  int64_t Hkv, G, d, Ev, D, P;
  const int64_t* prefix_len;
  const void* weight;
  double sq, sk;
  double work_per_thread;
  int64_t causal;
};

// one [B, H, L, X] tensor with a contiguous last dimension: its data and element strides
struct View {
  void* data;
  int64_t b, h, l;
};

// the tensors of one prefill call (lengths read from them, so a plan serves every length)
struct PrefillTensors {
  int64_t B, Lq, Lk;
  View q, k, v, y;               // q [B, Hkv G, Lq, d], k [B, Hkv, Lk, d], v [B, Hkv, Lk, Ev], y [B, Hkv G, Lq, Ev]
  const uint8_t* keep;           // [B, Lk] contiguous, 0 = ignore the key; or null
  void* S;                       // state element (b, h, D, f) at S[b s_b + h s_h + D s_d + f s_f]
  int64_t s_b, s_h, s_d, s_f;
};

// the constants of a window-mode decode plan (MATH.md section 6)
struct WindowDecodeArgs {
  DecodeArgs base;               // N = B Hkv heads, G, sizes, hierarchy, input scales, thread policy
  int64_t Hkv, W, S;             // kv heads per batch row (flags and positions are per row), window, sinks
  int64_t recentre;              // 1: centre c' = mu' - alpha sd' read from the far state; 0: c' = -delta
};

// the tensors of one window-mode decode step, all contiguous; T the compute dtype, TS the state's
struct WindowDecodeTensors {
  const void* q;                 // [N, G, d] T
  const void* k;                 // [N, d] T
  const void* v;                 // [N, Ev] T
  const uint8_t* keep;           // [B] 0 = padded token; or null
  const void* S_in;              // far state [N, F, D] TS
  void* S_out;                   // [N, F, D] TS, may be S_in
  void* y;                       // [N, G, Ev] T
  void* win_k;                   // [N, W, d] TS, slot p % W holds position p; updated in place (or from win_k_src)
  void* win_v;                   // [N, W, Ev] TS, updated in place (or from win_v_src)
  uint8_t* win_keep;             // [B, W] bool: the slot holds a kept key that is not a sink; updated in place (or
                                 // from win_keep_src)
  void* sink_k;                  // [N, S, d] TS, updated in place (or from sink_k_src)
  void* sink_v;                  // [N, S, Ev] TS, updated in place (or from sink_v_src)
  int64_t* sink_pos;             // [B, S] position of each sink, -1 while free; updated in place (or from sink_pos_src)
  const void* key_centre;        // [N, d] TS subtracted from the far state's keys; or null
  const void* alpha;             // [Hkv G] T per query head (recentre only)
  const void* beta;              // [Hkv G] T per query head: taylor_mix
  int64_t n_tokens;              // positions before this step (the same in every batch row)
  // the six buffers above (win_k .. sink_pos) before the step, when they are new (uninitialised) buffers that
  // the step fills from these (the window and sinks head by head, as it reads them); all null: in place
  const void* win_k_src;         // [N, W, d] TS
  const void* win_v_src;         // [N, W, Ev] TS
  const uint8_t* win_keep_src;   // [B, W]
  const void* sink_k_src;        // [N, S, d] TS
  const void* sink_v_src;        // [N, S, Ev] TS
  const int64_t* sink_pos_src;   // [B, S]
  const void* q_far;             // [N, G, d] T the far part's own queries (a converted hybrid's maps); or null: q
  const void* k_far;             // [N, d] T the far part's own version of the key the step absorbs (the leaving
                                 // slot's; the new key's for W = 0); or null: that key itself
};


// the constants of a window-mode causal prefill plan (MATH.md section 6)
struct WindowPrefillArgs {
  PrefillArgs base;              // Hkv, G, sizes, hierarchy, input scales, thread policy (causal)
  int64_t W, S;                  // window, sinks
  int64_t recentre;              // 1: centre c' = mu' - alpha sd' read from the far keys; 0: c' = -delta
};

// the tensors of one window-mode causal prefill call, all contiguous, N = B Hkv heads; T the compute
// dtype, TS the state's. The extended stream of a head is the state's window (oldest first) then the
// call's L keys: stream position e < L is far for call query i when e <= i, exact when i < e <= i + W.
struct WindowPrefillTensors {
  int64_t B, L;
  const void* q;                 // [N, G, L, d] T
  const void* k_win;             // [N, W, d] T the state's window keys, oldest first (read where flagged)
  const void* v_win;             // [N, W, Ev] T
  const void* k;                 // [N, L, d] T the call's keys (read where flagged)
  const void* v;                 // [N, L, Ev] T
  const uint8_t* flag;           // [B, W + L] 1 = a kept key that is not a sink, window then call
  const void* sink_k;            // [N, S, d] T the sinks after the call
  const void* sink_v;            // [N, S, Ev] T
  const int64_t* sink_pos;       // [B, S] stream position of each sink, -1 while free
  const void* key_centre;        // [N, d] T subtracted from the far state's keys; or null
  const void* alpha;             // [Hkv G] T per query head (recentre only)
  const void* beta;              // [Hkv G] T per query head: taylor_mix
  void* S;                       // far state [N, F, D] TS, updated in place
  void* y;                       // [N, G, L, Ev] T
  int64_t n_tokens;              // positions before the call
  const void* q_far;             // [N, G, L, d] T the far part's own queries (a converted hybrid's maps); or null: q
  const void* k_far;             // [N, L, d] T the far part's own keys of the call; or null: k (with q_far only
                                 // for a stream's first call: no window key is far)
};

}  // extern "C"

namespace sata {

// x rounded up to a multiple of m
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// an allocator of 64-byte aligned memory: workspaces whose rows are whole 64-byte vectors, so no full-vector
// load or store of a row straddles two cache lines (malloc aligns to 16 bytes only)
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

template <typename T>
using avector = std::vector<T, Aligned64<T>>;

// the bytes of the target's vector registers: 64 on AVX-512, 32 on AVX, else 16 (SSE, NEON). Vectors wider
// than the registers are split by the compiler, but broadcasting a scalar to them goes lane by lane through the
// stack: the AVX2 build of the prefill ran ~30x slower with 64-byte vectors than with 32-byte ones
#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#elif defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif

// the narrow vectors of short rows (feature segments, value rows of the decode): 32 bytes, or VBYTES below
constexpr int NARROW = VBYTES < 32 ? VBYTES : 32;

// one vector of `Bytes` bytes of T (GCC/Clang vector extension: SIMD where the target has it)
template <typename T, int Bytes = VBYTES>
struct Vec {
  static constexpr int W = Bytes / sizeof(T);
  typedef T type __attribute__((vector_size(Bytes)));
  static type load(const T* p) {
    type x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  static void store(T* p, type x) { std::memcpy(p, &x, sizeof(x)); }
};

template <typename T>
struct Bits;  // the integer lanes of T: bit casts and shuffle masks
template <>
struct Bits<float> {
  typedef int32_t type;
};
template <>
struct Bits<double> {
  typedef int64_t type;
};

// the integer vector {f(0), f(1), ..., f(L - 1)}, a constant: a shuffle mask built at compile time
template <typename M, typename F, int... l>
constexpr M lane_mask(F f, std::integer_sequence<int, l...>) {
  return M{f(l)...};
}

// x with its lanes rotated down by h (lane l takes lane l + h mod L)
template <typename T, int h>
inline typename Vec<T>::type rotate(typename Vec<T>::type x) {
  constexpr int L = Vec<T>::W;
  typedef typename Bits<T>::type M __attribute__((vector_size(sizeof(x))));
  constexpr M up = lane_mask<M>([](int l) { return (l + h) % L; }, std::make_integer_sequence<int, L>{});
  return __builtin_shuffle(x, up);
}

// the largest lane and the sum of the lanes of x, in log2(lanes) steps, each folding half the lanes
template <typename T>
inline T lanes_max(typename Vec<T>::type x) {
  const auto fold = [](auto x, auto y) { return y > x ? y : x; };
  constexpr int L = Vec<T>::W;
  if constexpr (L >= 16) x = fold(x, rotate<T, 8>(x));
  if constexpr (L >= 8) x = fold(x, rotate<T, 4>(x));
  if constexpr (L >= 4) x = fold(x, rotate<T, 2>(x));
  x = fold(x, rotate<T, 1>(x));
  return x[0];
}

template <typename T>
inline T lanes_sum(typename Vec<T>::type x) {
  constexpr int L = Vec<T>::W;
  if constexpr (L >= 16) x += rotate<T, 8>(x);
  if constexpr (L >= 8) x += rotate<T, 4>(x);
  if constexpr (L >= 4) x += rotate<T, 2>(x);
  x += rotate<T, 1>(x);
  return x[0];
}

// flops of a call over `heads` heads: a state update per key and a read-out per query, 2 F D each
inline double work(int64_t heads, int64_t keys, int64_t queries, int64_t F, int64_t D) {
  return 2.0 * double(heads) * double(keys + queries) * double(F) * double(D);
}

// torch's thread count, capped by the units of parallel work and by what the work pays for
inline int64_t threads_for(int64_t units, double flops, double work_per_thread) {
  const int64_t most = std::min<int64_t>(at::get_num_threads(), units);
  const double paid = flops / std::max(work_per_thread, 1.0);
  return std::max<int64_t>(1, paid < double(most) ? int64_t(paid) : most);
}

// f() on each of nt threads of torch's pool (the calling thread alone when nt == 1); the threads
// share the work out among themselves
template <typename F>
inline void on_threads(int64_t nt, const F& f) {
  if (nt <= 1) {
    f();
    return;
  }
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f();
  });
}

// an entry point's body with every C++ exception turned into a status (0 = done, 1 = failed):
// nothing may unwind through the C interface
template <typename F>
inline int guarded(const F& f) noexcept {
  try {
    f();
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // namespace sata
