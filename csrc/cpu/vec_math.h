// The vector primitives that csrc/include/fused_loss/elementwise_math.h expects, for
// at::vec::Vectorized. Include before that header.
#pragma once

#include "vec_io.h"

namespace fused_loss {

using cpu::Vectorized;

// exp_u20: ATen's faster exp (the one its softmax uses; for double it is Sleef's exp). It
// clamps a NaN argument to a finite result, so NaN is put back: fl_exp(NaN) is NaN, as for
// the scalar std::exp, and every loss built on it propagates NaN inputs like torch.
template <typename A>
inline Vectorized<A> fl_exp(Vectorized<A> x) { return Vectorized<A>::blendv(x.exp_u20(), x, x != x); }
template <typename A>
inline Vectorized<A> fl_log1p_01(Vectorized<A> x) { return x.log1p(); }
// float: 2 atanh(s) with s = t / (2 + t), where t = e below sqrt(2) - 1 and t = (e - 1) / 2
// (exact) plus log 2 above, so |s| <= 0.172 and four terms of the odd series reach float
// precision (relative error under 1.5 float eps over [0, 1], subnormals included; NaN gives
// NaN, 0 gives 0). A third of the cost of Sleef's log1p for any argument, which took half the
// time of BCE and focal loss. Written in 2s (2t / (2 + t) keeps a subnormal t exact) and
// w = (2s)^2.
inline Vectorized<float> fl_log1p_01(Vectorized<float> e) {
  using V = Vectorized<float>;
  const V upper = e > V(0.41421356237f);
  const V t = V::blendv(e, (e - V(1)) * V(0.5f), upper);
  const V s2 = (t + t) / (V(2) + t), w = s2 * s2;
  // (2 atanh(s) - 2s) / (2s w) = 1/12 + w/80 + w^2/448 + w^3/2304 + ...
  V q = at::vec::fmadd(V(1.f / 2304), w, V(1.f / 448));
  q = at::vec::fmadd(q, w, V(1.f / 80));
  q = at::vec::fmadd(q, w, V(1.f / 12));
  return V::blendv(V(0), V(0.693147180559945f), upper) + (s2 + s2 * w * q);
}
template <typename A>
inline Vectorized<A> fl_abs(Vectorized<A> x) { return x.abs(); }
template <typename A>
inline Vectorized<A> fl_max(Vectorized<A> a, Vectorized<A> b) { return at::vec::maximum(a, b); }
template <typename A>
inline Vectorized<A> fl_min(Vectorized<A> a, Vectorized<A> b) { return at::vec::minimum(a, b); }
template <typename A>
inline Vectorized<A> fl_sign(Vectorized<A> x) {
  const Vectorized<A> zero(0), one(1);
  return Vectorized<A>::blendv(zero, one, zero < x) - Vectorized<A>::blendv(zero, one, x < zero);
}
template <typename A>
inline Vectorized<A> fl_where_ge0(Vectorized<A> c, Vectorized<A> a, Vectorized<A> b) {
  return Vectorized<A>::blendv(b, a, c >= Vectorized<A>(0));
}
template <typename A>
inline Vectorized<A> fl_where_lt(Vectorized<A> c, Vectorized<A> d, Vectorized<A> a, Vectorized<A> b) {
  return Vectorized<A>::blendv(b, a, c < d);
}
template <typename A>
inline Vectorized<A> fl_where_le(Vectorized<A> c, Vectorized<A> d, Vectorized<A> a, Vectorized<A> b) {
  return Vectorized<A>::blendv(b, a, c <= d);
}
template <typename A, typename P>
inline Vectorized<A> fl_pow(Vectorized<A> x, P p) { return x.pow(Vectorized<A>(A(p))); }

}  // namespace fused_loss
