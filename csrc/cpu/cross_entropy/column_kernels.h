// Column kernels of cross-entropy (inner > 1): position j of sample n holds its C logits
// inner apart; a vector covers kLanes consecutive positions, each lane an independent row.
#pragma once

#include "common.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {


template <typename T, typename Body>
void for_each_column_tile(const Geometry& g, Body body) {
  const int64_t tiles = ceil_div(g.inner, kLanes<T>);
  at::parallel_for(0, g.outer * tiles, grain_for(g.classes * kLanes<T>), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, j0 = (task % tiles) * kLanes<T>;
      body(n, j0, std::min(kLanes<T>, g.inner - j0));
    }
  });
}

// Per-lane max and, with the max known, sum of exp and the extra sums; `terms(c, v, r)`
// adds class c's contribution, relative to r, the lane's max where finite (see Partial).
// Returns lane arrays through the callbacks' captures.
template <typename T, typename Terms>
void column_stats(const T* xb, const Geometry& g, int64_t nl, AccVec<T>& vmax, AccVec<T>& vsum, AccVec<T>& r,
                  Terms terms) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  vmax = V(kNegInf<A>);
  for (int64_t c = 0; c < g.classes; ++c) vmax = at::vec::maximum(vmax, load_vec(xb + c * g.inner, nl));
  // finite lanes shift by their max (inf - inf and NaN are NaN), the others by 0: one shift
  // for the exp and the sums, as in the row kernels
  r = V::blendv(V(0), vmax, (vmax - vmax) == V(0));
  vsum = V(0);
  for (int64_t c = 0; c < g.classes; ++c) {
    const V v = load_vec(xb + c * g.inner, nl);
    vsum += (v - r).exp_u20();
    terms(c, v, r);
  }
}

}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu
