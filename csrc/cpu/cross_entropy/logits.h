// The logits a cross-entropy row kernel sees. Plain: the input itself. Shaped (the LLM
// options softcap and temperature):
//   z = softcap * tanh(x / softcap) / temperature      (either part optional)
// applied to each line as it is loaded, in the statistics pass and again in the gradient
// pass (which also needs dz/dx), so z is never stored. Both maps are non-decreasing, so a
// block's max is the map of the raw max: the max pass runs on the raw logits.
//
// A shaped row also gathers the sum h = sum_c exp(z_c - m) (z_c - m) for its entropy,
// log_sum - h / s (see Partial); plain rows skip that work entirely.
#pragma once

#include <cfloat>

#include "common.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {

template <typename T>
struct PlainLogits {
  using A = acc_t<T>;
  using V = AccVec<T>;
  static constexpr bool kShaped = false;
  A scalar(A x) const { return x; }
  void apply(V*) const {}
};

template <typename T>
struct ShapedLogits {
  using A = acc_t<T>;
  using V = AccVec<T>;
  static constexpr bool kShaped = true;
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

  // z in place, for the statistics pass.
  void apply(V* v) const {
    for (int k = 0; k < kVecsPerLine<T>; ++k) v[k] = capped ? (v[k] * V(inv_cap)).tanh() * V(z_per_tanh) : v[k] * V(inv_t);
  }

  // z in place and dz/dx beside it, for the gradient pass: dz/dx = (1 - tanh^2) / temperature.
  void apply(V* v, V* slope) const {
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      if (capped) {
        const V th = (v[k] * V(inv_cap)).tanh();
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
