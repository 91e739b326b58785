// Drives fused_loss/row_sums.h (the CUDA kernels' per-thread row sums) on the host for
// tests/test_row_sums.py: each case's row is split between `threads` threads as the CUDA row
// kernels split it (16-byte vectors of 4 values round-robin, then single values), each thread
// adds its share, and the threads merge in the warp's shuffle-down tree.
// stdin: cases, then per case: n threads stats linear, n values, n linear weights.
// stdout per case: max s h lin wsum raw log_sum entropy.
#include <cstdio>
#include <vector>

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

int main(int argc, char** argv) {
  const bool as_float = argc > 1 && argv[1][0] == 'f';
  int cases;
  if (std::scanf("%d", &cases) != 1) return 1;
  for (int c = 0; c < cases; ++c) {
    if (as_float) run_case<float>(); else run_case<double>();
  }
  return 0;
}
