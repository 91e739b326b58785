// Cross-entropy per-row math, shared by the CPU and CUDA kernels so that the
// numerics tested on the CPU are the ones the GPU runs.
//
// For one row (a sample, or one spatial position of a K-dimensional input) with logits
// x_c, class weights w_c (all 1 when no weight is given), W = sum_c w_c, smoothing eps
// and C classes, torch's cross-entropy is
//   class index y:   (1-eps) w_y (lse - x_y) + eps/C * sum_c w_c (lse - x_c)
//   probabilities t: sum_c w_c t'_c (lse - x_c),   t'_c = (1-eps) t_c + eps/C
// The sums over c are gathered in one pass relative to a shift r (the row's max when
// finite; in the CPU row kernels, each block's max, moved to the row's when blocks merge),
// which keeps them accurate whatever the logits' offset or spread:
//   sum_c w_c (lse - x_c) = W (lse - r) - sum_c w_c (x_c - r).
//
// Precision. lse is never formed as one number: a float32 lse is rounded to the ulp of
// the largest logit, and lse - x_c would carry that rounding (2.6e-4 relative gradient
// error at a logit offset of 1e4). A row keeps its max m and log_sum = log sum_c
// exp(x_c - m) apart, and every lse - x is computed as (m - x) + log_sum, as torch's
// log_softmax computes (x - m) - log_sum.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace fused_loss {

// Options of one cross-entropy call, in the accumulation type A.
template <typename A>
struct CrossEntropyParams {
  bool smooth;   // label_smoothing > 0 (torch ignores a smoothing <= 0)
  A eps;         // label smoothing when smooth, else 0
  A eps_over_c;  // eps / C
  A w_sum;       // sum of class weights (C without weights)
  A z_loss;      // coefficient of the z-loss term z_loss * w_y * lse^2 (0: none)
};

// A row's log-sum-exp, kept as its two parts (see Precision above).
template <typename A>
struct RowLse {
  A max;      // the row's largest logit
  A log_sum;  // log sum_c exp(x_c - max); NaN marks a row whose loss and gradient are NaN
};

// lse - x, without forming lse.
template <typename A>
FL_HOST_DEVICE A lse_minus(const RowLse<A>& l, A x) {
  return (l.max - x) + l.log_sum;
}

// Loss of a row with a class-index target. sx = sum_c w_c (x_c - r).
template <typename A>
FL_HOST_DEVICE A ce_class_row_loss(const CrossEntropyParams<A>& p, const RowLse<A>& l, A x_y, A w_y, A r, A sx) {
  if (!p.smooth) return w_y * lse_minus(l, x_y);
  return (A(1) - p.eps) * w_y * lse_minus(l, x_y) + p.eps_over_c * (p.w_sum * lse_minus(l, r) - sx);
}

// Loss of a row with probability targets. swt = sum_c w_c t'_c, swtx = sum_c w_c t'_c (x_c - r).
template <typename A>
FL_HOST_DEVICE A ce_prob_row_loss(const RowLse<A>& l, A r, A swt, A swtx) {
  return lse_minus(l, r) * swt - swtx;
}

// The z-loss term of a row (PaLM): z_loss * lse^2, weighted like the row's cross-entropy
// term (w_y). Its gradient adds 2 z_loss w_y lse p_c to each class: see ce_class_grad_coefs.
template <typename A>
FL_HOST_DEVICE A ce_z_loss_row(const CrossEntropyParams<A>& p, const RowLse<A>& l, A w_y) {
  const A lse = l.max + l.log_sum;
  return p.z_loss * w_y * lse * lse;
}

// Smoothed target t'_c.
template <typename A>
FL_HOST_DEVICE A ce_smoothed_target(A t, A one_minus_eps, A eps_over_c) {
  return t * one_minus_eps + eps_over_c;
}

// The gradient of a class-index row is dx_c = p_c * a - b * w_c - [c == y] * t_y with
// p_c = exp((x_c - max) - log_sum) and g the row's share of the upstream gradient (0 for
// ignored rows).
template <typename A>
struct CrossEntropyClassGrad {
  A a;    // multiplies p_c
  A b;    // multiplies w_c (or 1): the smoothing part
  A t_y;  // subtracted at the target class
};

template <typename A>
FL_HOST_DEVICE CrossEntropyClassGrad<A> ce_class_grad_coefs(const CrossEntropyParams<A>& p, A g, A w_y,
                                                            const RowLse<A>& l) {
  CrossEntropyClassGrad<A> cf{g * w_y, A(0), g * w_y};
  if (p.smooth) {
    const A t_y = g * (A(1) - p.eps) * w_y;
    cf = {t_y + g * p.eps_over_c * p.w_sum, g * p.eps_over_c, t_y};
  }
  if (p.z_loss != A(0)) cf.a += A(2) * p.z_loss * g * w_y * (l.max + l.log_sum);
  return cf;
}

// Mixing the statistics of two parts of a row: running max m and sum s of exp(x - m).
// `exp_fn` lets each backend use its own exp; the parts are merged in a fixed order so
// that results do not depend on the thread count.
template <typename A, typename Exp>
FL_HOST_DEVICE void merge_max_sumexp(A& m, A& s, A m_part, A s_part, Exp exp_fn) {
  if (m_part > m || m_part != m_part) {  // a part's NaN max wins: the row's lse is NaN, as torch's
    s = s * exp_fn(m - m_part) + s_part;
    m = m_part;
  } else if (s_part != A(0)) {  // also propagates NaN (NaN != 0)
    s += s_part * exp_fn(m_part - m);
  }
}

}  // namespace fused_loss
