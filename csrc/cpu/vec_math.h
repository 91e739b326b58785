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
inline Vectorized<A> fl_log1p(Vectorized<A> x) { return x.log1p(); }
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
