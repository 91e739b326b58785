// Drives the CUDA row kernels' host+device headers on the host, for tests/test_row_sums.py.
//  `driver d|f` (fused_loss/row_sums.h): each case's row is split between `threads` threads as
//    the CUDA row kernels split it (vectors of 4 values round-robin, then single values), each
//    thread adds its share, and the threads merge in the warp's shuffle-down tree.
//    stdin: cases, then per case: n threads stats linear, n values, n linear weights.
//    stdout per case: max s h lin wsum raw log_sum entropy.
//  `driver split` (fused_loss/row_split.h): for_row, for_row_pair and map_row, over every lane of
//    groups of 1 to 256 threads, rows of 0 to 70 elements at every alignment, visit every element
//    exactly once with its own value; prints "ok" or the first failure.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "fused_loss/row_split.h"
#include "fused_loss/row_sums.h"

using fused_loss::RowAcc;

template <typename A>
void run_case() {
  int n, threads, stats, linear;
  if (std::scanf("%d %d %d %d", &n, &threads, &stats, &linear) != 4) return;
  std::vector<A> x(n), u(n);
  for (auto& v : x) {
    double d;
    if (std::scanf("%lf", &d) != 1) return;
    v = A(d);
  }
  for (auto& v : u) {
    double d;
    if (std::scanf("%lf", &d) != 1) return;
    v = A(d);
  }
  std::vector<RowAcc<A>> acc(threads, RowAcc<A>::empty(stats != 0, linear != 0));
  constexpr int V = 4;
  const int vectors = n / V;
  for (int v = 0; v < vectors; ++v) {
    A z[V], w[V];
    for (int k = 0; k < V; ++k) z[k] = x[v * V + k], w[k] = u[v * V + k];
    acc[v % threads].add(z, z, w);
  }
  for (int i = vectors * V; i < n; ++i) {
    A z[1] = {x[i]}, w[1] = {u[i]};
    acc[i % threads].add(z, z, w);
  }
  for (int d = threads / 2; d > 0; d /= 2) {
    for (int i = 0; i < d; ++i) acc[i].merge(acc[i + d]);
  }
  const RowAcc<A>& r = acc[0];
  const auto l = r.lse();
  std::printf("%.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g\n", double(r.m), double(r.s), double(r.h),
              double(r.lin), double(r.wsum), double(r.raw), double(l.log_sum), double(r.entropy(l)));
}

// Element c of every buffer holds value(c, buffer).
template <typename T>
T value(int64_t c, int buffer) { return T(c * 3 + buffer); }

template <typename T>
bool check_split(int64_t n, int ox, int ot, int size) {
  constexpr int kSlack = 16 / sizeof(T);
  std::vector<T> xb(n + 4 * kSlack), tb(n + 4 * kSlack), db(n + 4 * kSlack, T(-1));
  // ox, ot elements past the second 16-byte boundary of each buffer (16 bytes of slack before).
  auto at = [](std::vector<T>& b, int offset) {
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(b.data()) + 31) / 16 * 16) + offset;
  };
  T* xa = at(xb, ox);
  T* ta = at(tb, ot);
  T* da = at(db, ot);
  for (int64_t c = 0; c < n; ++c) xa[c] = value<T>(c, 0), ta[c] = value<T>(c, 1);
  std::vector<int> seen(n, 0), seen_pair(n, 0);
  bool ok = true;
  for (int lane = 0; lane < size; ++lane) {
    const fused_loss::RowGroup g{lane, size};
    fused_loss::for_row(xa, n, g, [&](int64_t c, T v) { ok &= v == value<T>(c, 0); ++seen[c]; },
                        [&](int64_t c0, const fused_loss::Pack<T, fused_loss::kVec<T>>& p) {
                          for (int k = 0; k < fused_loss::kVec<T>; ++k) ok &= p.v[k] == value<T>(c0 + k, 0), ++seen[c0 + k];
                        });
    fused_loss::for_row_pair(
        xa, ta, n, g, [&](int64_t c, T v, T t) { ok &= v == value<T>(c, 0) && t == value<T>(c, 1); ++seen_pair[c]; },
        [&](int64_t c0, const fused_loss::Pack<T, fused_loss::kVec<T>>& p, const fused_loss::Pack<T, fused_loss::kVec<T>>& q) {
          for (int k = 0; k < fused_loss::kVec<T>; ++k) {
            ok &= p.v[k] == value<T>(c0 + k, 0) && q.v[k] == value<T>(c0 + k, 1);
            ++seen_pair[c0 + k];
          }
        });
    fused_loss::map_row(xa, da, n, g, [&](int64_t c, T v) { ok &= v == value<T>(c, 0); return T(double(v) + 1); });
  }
  for (int64_t c = 0; c < n; ++c) ok &= seen[c] == 1 && seen_pair[c] == 1 && da[c] == T(double(value<T>(c, 0)) + 1);
  ok &= da[-1] == T(-1) && da[n] == T(-1);  // nothing written outside the row
  if (!ok) std::printf("failed: sizeof %d n %ld x offset %d t/dx offset %d group %d\n", int(sizeof(T)), long(n), ox, ot, size);
  return ok;
}

template <typename T>
bool check_splits() {
  for (int64_t n = 0; n <= 70; ++n)
    for (int ox = 0; ox < 16 / int(sizeof(T)); ++ox)
      for (int ot = 0; ot < 16 / int(sizeof(T)); ++ot)
        for (int size : {1, 2, 3, 32, 256})
          if (!check_split<T>(n, ox, ot, size)) return false;
  return true;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "split") {
    const bool ok = check_splits<double>() && check_splits<float>() && check_splits<int16_t>();
    std::printf("%s\n", ok ? "ok" : "");
    return ok ? 0 : 1;
  }
  const bool as_float = argc > 1 && argv[1][0] == 'f';
  int cases;
  if (std::scanf("%d", &cases) != 1) return 1;
  for (int c = 0; c < cases; ++c) {
    if (as_float) run_case<float>(); else run_case<double>();
  }
  return 0;
}
