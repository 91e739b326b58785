// A row's sums gathered in one read, in pieces merged in any fixed order: the CUDA kernels'
// per-thread state (each thread sums its share of a row, then the warp or block merges them).
// Host and device code with no dependency, so that tests/test_row_sums.py checks it on the CPU
// against direct formulas (every split and merge order, -inf, +inf and NaN).
#pragma once

#include <cmath>
#include <limits>

#include "cross_entropy_math.h"

namespace fused_loss {

// The accumulation type's math, the same names on host and device (the accurate expf, not
// __expf: results must match torch's).
FL_HOST_DEVICE float acc_exp(float v) { return expf(v); }
FL_HOST_DEVICE double acc_exp(double v) { return exp(v); }
FL_HOST_DEVICE float acc_log(float v) { return logf(v); }
FL_HOST_DEVICE double acc_log(double v) { return log(v); }
FL_HOST_DEVICE float acc_tanh(float v) { return tanhf(v); }
FL_HOST_DEVICE double acc_tanh(double v) { return tanh(v); }
#ifdef __CUDA_ARCH__
template <typename A>
FL_HOST_DEVICE bool acc_isfinite(A v) { return isfinite(v); }
template <typename A>
FL_HOST_DEVICE bool acc_isnan(A v) { return isnan(v); }
#else
template <typename A>
FL_HOST_DEVICE bool acc_isfinite(A v) { return std::isfinite(v); }
template <typename A>
FL_HOST_DEVICE bool acc_isnan(A v) { return std::isnan(v); }
#endif

template <typename A>
FL_HOST_DEVICE A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// The shift of a row's linear sums: its max when finite, else 0 (see cross_entropy_math.h).
template <typename A>
FL_HOST_DEVICE A shift_of(A m) { return acc_isfinite(m) ? m : A(0); }

// A row's log-sum-exp from its max m and sum s of exp(x - m). A row whose max is not finite
// (it holds NaN or +inf, or all its logits are -inf) or whose sum is NaN gets a NaN log_sum, as
// torch's log_softmax gives NaN there (the CPU's row_lse).
template <typename A>
FL_HOST_DEVICE RowLse<A> row_lse(A m, A s) {
  if (!acc_isfinite(m) || acc_isnan(s)) return {m, std::numeric_limits<A>::quiet_NaN()};
  return {m, acc_log(s)};
}

// One thread's (then, merged, a row's) running sums over logits z_c seen so far, relative to
// their running max m:
//   s = sum exp(z - m);  h = sum exp(z - m) (z - m)  (entropy, with stats);
//   lin = sum u_c (z_c - shift_of(m)), wsum = sum u_c  (with linear terms: u_c = w_c for the
//   smoothing of class targets, w_c t'_c for probability targets);  raw = max of the raw x.
// Moving m to a larger M rescales s and h and shifts lin, so one read of the row gives them all.
template <typename A>
struct RowAcc {
  A m, s, h, lin, wsum, raw;
  bool stats, linear;  // which optional sums are kept (uniform over the grid)

  FL_HOST_DEVICE static RowAcc empty(bool stats, bool linear) {
    return {neg_inf<A>(), A(0), A(0), A(0), A(0), neg_inf<A>(), stats, linear};
  }

  FL_HOST_DEVICE void rescale(A M) {
    if (M == m) return;  // also two -inf
    if (s != A(0)) {     // (NaN != 0: NaN propagates)
      const A d = m - M, e = acc_exp(d);
      if (stats) h = e * (h + d * s);
      s *= e;
    }
    if (linear) lin += (shift_of(m) - shift_of(M)) * wsum;
    m = M;
  }

  // N logits z (raw_x: the unshaped ones, for the stats' max) with their linear weights u.
  template <int N>
  FL_HOST_DEVICE void add(const A (&z)[N], const A (&raw_x)[N], const A (&u)[N]) {
    A mx = m;
    for (int k = 0; k < N; ++k) mx = z[k] > mx ? z[k] : mx;  // NaN never becomes the max
    rescale(mx);
    // Relative to the shift, not m: while every logit so far is -inf, m is -inf and z - m would be
    // -inf - -inf = NaN (the shift is 0 then, and exp(-inf - 0) = 0).
    const A r = shift_of(m);
    for (int k = 0; k < N; ++k) {
      const A d = z[k] - r, e = acc_exp(d);
      s += e;
      if (stats) {
        const A lowest = std::numeric_limits<A>::lowest();
        h += e * (d > lowest ? d : lowest);  // a logit of -inf adds 0, not 0 * -inf (NaN stays NaN via s)
        raw = raw_x[k] > raw || acc_isnan(raw_x[k]) ? raw_x[k] : raw;  // a NaN row is never "correct"
      }
      if (linear) {
        lin += u[k] * (z[k] - r);
        wsum += u[k];
      }
    }
  }

  FL_HOST_DEVICE void merge(RowAcc o) {
    const A M = o.m > m ? o.m : m;
    rescale(M);
    o.rescale(M);
    s += o.s;
    if (stats) {
      h += o.h;
      raw = o.raw > raw || acc_isnan(o.raw) ? o.raw : raw;
    }
    if (linear) {
      lin += o.lin;
      wsum += o.wsum;
    }
  }

  FL_HOST_DEVICE RowLse<A> lse() const { return row_lse(m, s); }
  // entropy of softmax(z) = log_sum - h / s.
  FL_HOST_DEVICE A entropy(const RowLse<A>& l) const { return l.log_sum - h / s; }
};

}  // namespace fused_loss
