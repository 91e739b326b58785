// The logits a cross-entropy row kernel sees. Plain: the input itself. Shaped (the LLM
// options softcap and temperature):
//   z = softcap * tanh(x / softcap) / temperature      (either part optional)
// applied to each line as it is loaded, in the statistics pass and again in the gradient
// pass (which also needs dz/dx), so z is never stored. Both maps are non-decreasing, so a
// block's max is the map of the raw max: the max pass runs on the raw logits.
//
// With return_stats a row also gathers the sum h = sum_c exp(z_c - m) (z_c - m) for its
// entropy, log_sum - h / s (see Partial); other rows skip that work entirely.
#pragma once

#include <cfloat>

#include "common.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {

// tanh for the softcap: Sleef's tanh (what Vectorized::tanh calls) is a library call per vector
// that made softcapped rows 3x slower; this one is inlined. |u| < 0.6: u * P(u^2), P a
// least-squares fit of tanh(u)/u on [0, 0.36] (Chebyshev nodes); above: (1 - e) / (1 + e)
// with e = exp(-2|u|), free of cancellation there. Measured against float64 tanh in float32:
// at most 2 ulp with an exactly rounded exp, plus exp_u20's own error. Doubles keep Sleef.
inline Vectorized<float> softcap_tanh(const Vectorized<float>& u) {
  using V = Vectorized<float>;
  const V a = u.abs(), s = u * u;
  V p(-0.0008414526f);
  for (float c : {0.0032752846f, -0.0087735323f, 0.021855190f, -0.053967019f, 0.13333328f, -0.33333333f, 1.0f}) {
    p = at::vec::fmadd(p, s, V(c));  // an explicit FMA: the build contracts nothing itself
  }
  p = p * u;
  // Softcapped logits mostly lie well inside the cap: then the polynomial alone serves.
  if (V::blendv(V(0.0f), V(1.0f), a < V(0.6f)).zero_mask() == 0) return p;  // every lane small (NaN is not)
  const V e = (a * V(-2.0f)).exp_u20();
  V r = (V(1.0f) - e) / (V(1.0f) + e);
  r = V::blendv(r, V(0.0f) - r, u < V(0.0f));
  r = V::blendv(r, p, a < V(0.6f));
  return V::blendv(r, u, u != u);  // NaN stays NaN (exp_u20 does not propagate it)
}
inline Vectorized<double> softcap_tanh(const Vectorized<double>& u) { return u.tanh(); }

template <typename T>
struct PlainLogits {
  using A = acc_t<T>;
  using V = AccVec<T>;
  static constexpr bool kShaped = false;
  static constexpr bool kEntropy = false;
  A scalar(A x) const { return x; }
  bool slope_varies() const { return false; }
  void apply(V*) const {}
};

// kStats: the row's entropy sum is gathered too (return_stats).
template <typename T, bool kStats>
struct ShapedLogits {
  using A = acc_t<T>;
  using V = AccVec<T>;
  static constexpr bool kShaped = true;
  static constexpr bool kEntropy = kStats;
  bool capped;
  A inv_cap;     // 1 / softcap
  A z_per_tanh;  // softcap / temperature: z = tanh(x / softcap) * z_per_tanh
  A inv_t;       // 1 / temperature

  static ShapedLogits make(std::optional<double> softcap, double temperature) {
    const bool capped = softcap.has_value();
    return {capped, capped ? A(1.0 / *softcap) : A(0), capped ? A(*softcap / temperature) : A(0),
            A(1.0 / temperature)};
  }

  A scalar(A x) const { return capped ? std::tanh(x * inv_cap) * z_per_tanh : x * inv_t; }

  // Whether dz/dx differs per element (else it is inv_t, and the one-pass forward keeps none).
  bool slope_varies() const { return capped; }

  // z in place, for the statistics pass.
  void apply(V* v) const {
    for (int k = 0; k < kVecsPerLine<T>; ++k) v[k] = capped ? softcap_tanh(v[k] * V(inv_cap)) * V(z_per_tanh) : v[k] * V(inv_t);
  }

  // z in place and dz/dx beside it, for the gradient pass: dz/dx = (1 - tanh^2) / temperature.
  void apply(V* v, V* slope) const {
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      if (capped) {
        const V th = softcap_tanh(v[k] * V(inv_cap));
        v[k] = th * V(z_per_tanh);
        slope[k] = (V(1) - th * th) * V(inv_t);
      } else {
        v[k] = v[k] * V(inv_t);
        slope[k] = V(inv_t);
      }
    }
  }
};

// exp(d) * d for the entropy sum, with 0 where exp(d) is 0 (a logit of -inf adds nothing,
// not 0 * -inf).
template <typename V>
inline V entropy_term(const V& e, const V& d) {
  using A = typename V::value_type;
  return e * at::vec::maximum(d, V(std::numeric_limits<A>::lowest()));
}

}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu
