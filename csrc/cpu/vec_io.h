// Loads, stores and prefetches between tensors of type T and at::vec vectors of the
// accumulation type (float for float/bfloat16/half, double for double).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fused_loss::cpu {
// Everything here is compiled for one CPU capability; the inline namespace keeps the
// symbols apart from another build of the same code (as ATen does).
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
using AccVec = Vectorized<acc_t<T>>;

// Lanes of one accumulation vector.
template <typename T>
constexpr int64_t kLanes = AccVec<T>::size();

// Elements of one "line": the T values that fill one full-width vector register
// (1 accumulation vector for float/double, 2 for the 16-bit types).
template <typename T>
constexpr int kVecsPerLine = sizeof(acc_t<T>) / sizeof(T);
template <typename T>
constexpr int64_t kLine = kLanes<T> * kVecsPerLine<T>;

template <typename T>
inline constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// One accumulation vector from kLanes<T> values; n < kLanes<T> loads n and zero-fills.
template <typename T>
inline AccVec<T> load_vec(const T* p, int64_t n = kLanes<T>) {
  if constexpr (is_reduced_v<T>) {
    auto v = Vectorized<T>::loadu(p, n);
    return std::get<0>(at::vec::convert_to_float<T>(v));
  } else {
    return n == kLanes<T> ? AccVec<T>::loadu(p) : AccVec<T>::loadu(p, n);
  }
}

template <typename T>
inline void store_vec(T* p, const AccVec<T>& v, int64_t n = kLanes<T>) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  } else {
    if (n == kLanes<T>) v.store(p); else v.store(p, n);
  }
}

// Full line of kLine<T> values.
template <typename T>
inline void load_line(const T* p, AccVec<T>* v) {
  if constexpr (is_reduced_v<T>) {
    auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    v[0] = lo;
    v[1] = hi;
  } else {
    v[0] = AccVec<T>::loadu(p);
  }
}

// Partial line: n < kLine<T> values, the rest zero.
template <typename T>
inline void load_line(const T* p, AccVec<T>* v, int64_t n) {
  for (int k = 0; k < kVecsPerLine<T>; ++k) {
    const int64_t nk = std::min<int64_t>(std::max<int64_t>(n - k * kLanes<T>, 0), kLanes<T>);
    v[k] = nk > 0 ? load_vec(p + k * kLanes<T>, nk) : AccVec<T>(0);
  }
}

template <typename T>
inline void store_line(T* p, const AccVec<T>* v, int64_t n = kLine<T>) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p, n);
  } else {
    if (n == kLine<T>) v[0].store(p); else v[0].store(p, n);
  }
}

// Bytes a line occupies; stream_line needs its pointer aligned to this.
template <typename T>
constexpr int64_t kLineBytes = kLine<T> * sizeof(T);

// Non-temporal store of a full line: the gradient is written once and not read back
// soon, so bypassing the cache saves the read-for-ownership of each destination line.
template <typename T>
inline void stream_line(T* p, const AccVec<T>* v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v[0]);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v[0]);
  } else {
    __m512i bits = at::vec::convert_from_float<T>(v[0], v[1]);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v[0]);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v[0]);
  } else {
    __m256i bits = at::vec::convert_from_float<T>(v[0], v[1]);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
  }
#else
  store_line(p, v);
#endif
}

// Orders this thread's non-temporal stores before whatever reads the result.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Software prefetch: with two cores busy computing exp, hardware prefetch alone does
// not keep enough reads in flight.
constexpr int64_t kPrefetchBytes = 2048;

inline void prefetch_ahead(const void* p, int64_t bytes) {
  __builtin_prefetch(static_cast<const char*>(p) + bytes, 0, 3);
}

inline void prefetch(const void* p) { prefetch_ahead(p, kPrefetchBytes); }

template <typename A>
inline A reduce_max(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename A>
inline A reduce_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}

// A compensated (Kahan) running sum per lane: a sum whose terms span many orders of
// magnitude (a masked logit of -1e9 beside logits near 0) keeps the small terms' digits.
// A non-finite term leaves no NaN in the compensation.
template <typename A>
struct CompensatedSum {
  Vectorized<A> sum{0}, comp{0};
  void add(const Vectorized<A>& v) {
    const Vectorized<A> y = v - comp, t = sum + y;
    const Vectorized<A> c = (t - sum) - y;
    comp = Vectorized<A>::blendv(c, Vectorized<A>(0), c != c);
    sum = t;
  }
  Vectorized<A> value() const { return sum - comp; }  // per lane
  A total() const { return reduce_sum(value()); }
};

// First n lanes of v, the others `fill`.
template <typename A>
inline Vectorized<A> keep_first(const Vectorized<A>& v, int64_t n, A fill) {
  return n >= Vectorized<A>::size() ? v : Vectorized<A>::set(Vectorized<A>(fill), v, n);
}

}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu
