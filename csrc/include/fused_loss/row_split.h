// Which elements of a row each thread of a group reads (the CUDA row kernels): whole 16-byte
// vectors round-robin between the group's lanes, the unaligned head and tail element by element.
// Host and device code with no dependency, so that tests/test_row_sums.py checks on the CPU that
// every element is visited exactly once, for every alignment, row length and group size.
#pragma once

#include <cstdint>

#include "cross_entropy_math.h"  // FL_HOST_DEVICE

namespace fused_loss {

// Vectors of 16 bytes where every pointer allows them.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// Elements of T before the first 16-byte boundary at p (p is aligned to sizeof(T)).
template <typename T>
FL_HOST_DEVICE int64_t misaligned_head(const T* p) {
  return int64_t((16 - reinterpret_cast<uintptr_t>(p) % 16) % 16) / int64_t(sizeof(T));
}

// The threads of a group share a row: lane `lane` of `group` threads (a warp or a block).
struct RowGroup {
  int lane, size;
};

// Elements before a row's first 16-byte vector.
template <typename T>
FL_HOST_DEVICE int64_t first_vector(const T* x, int64_t n) {
  const int64_t head = misaligned_head(x);
  return head < n ? head : n;
}

// Applies f(c, x_c) to the group's share of a row's n elements; fv(c, pack) to whole 16-byte
// vectors of them where the row allows (between its unaligned head and tail).
template <typename T, typename F1, typename FV>
FL_HOST_DEVICE void for_row(const T* x, int64_t n, RowGroup g, F1 f1, FV fv) {
  constexpr int V = kVec<T>;
  const int64_t head = first_vector(x, n);
  for (int64_t i = g.lane; i < head; i += g.size) f1(i, x[i]);
  const int64_t vectors = (n - head) / V;
  const Pack<T, V>* xv = reinterpret_cast<const Pack<T, V>*>(x + head);
  for (int64_t v = g.lane; v < vectors; v += g.size) fv(head + v * V, xv[v]);
  for (int64_t i = head + vectors * V + g.lane; i < n; i += g.size) f1(i, x[i]);
}

// Applies f1(c, x_c, t_c) to the group's share of two rows of n elements (logits and
// probability targets), fv(c, x pack, t pack) to whole 16-byte vectors where both rows are
// aligned alike (else element by element).
template <typename T, typename F1, typename FV>
FL_HOST_DEVICE void for_row_pair(const T* x, const T* t, int64_t n, RowGroup g, F1 f1, FV fv) {
  constexpr int V = kVec<T>;
  if ((reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(t)) % 16 != 0) {
    for (int64_t i = g.lane; i < n; i += g.size) f1(i, x[i], t[i]);
    return;
  }
  const int64_t head = first_vector(x, n);
  for (int64_t i = g.lane; i < head; i += g.size) f1(i, x[i], t[i]);
  const int64_t vectors = (n - head) / V;
  const Pack<T, V>* xv = reinterpret_cast<const Pack<T, V>*>(x + head);
  const Pack<T, V>* tv = reinterpret_cast<const Pack<T, V>*>(t + head);
  for (int64_t v = g.lane; v < vectors; v += g.size) fv(head + v * V, xv[v], tv[v]);
  for (int64_t i = head + vectors * V + g.lane; i < n; i += g.size) f1(i, x[i], t[i]);
}

// dx_c = f(c, x_c) over the group's share of a row (f converts x_c to its accumulation type; dx
// may be x: each element is read before it is written, by the same thread). 16-byte vectors
// where x and dx are aligned alike.
template <typename T, typename F>
FL_HOST_DEVICE void map_row(const T* x, T* dx, int64_t n, RowGroup g, F f) {
  constexpr int V = kVec<T>;
  if ((reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(dx)) % 16 != 0) {
    for (int64_t i = g.lane; i < n; i += g.size) dx[i] = static_cast<T>(f(i, x[i]));
    return;
  }
  const int64_t head = first_vector(x, n);
  for (int64_t i = g.lane; i < head; i += g.size) dx[i] = static_cast<T>(f(i, x[i]));
  const int64_t vectors = (n - head) / V;
  const Pack<T, V>* xv = reinterpret_cast<const Pack<T, V>*>(x + head);
  Pack<T, V>* dv = reinterpret_cast<Pack<T, V>*>(dx + head);
  for (int64_t v = g.lane; v < vectors; v += g.size) {
    const Pack<T, V> in = xv[v];
    Pack<T, V> out;
    for (int k = 0; k < V; ++k) out.v[k] = static_cast<T>(f(head + v * V + k, in.v[k]));
    dv[v] = out;
  }
  for (int64_t i = head + vectors * V + g.lane; i < n; i += g.size) dx[i] = static_cast<T>(f(i, x[i]));
}

}  // namespace fused_loss
