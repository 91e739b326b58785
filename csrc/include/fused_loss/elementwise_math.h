// Per-element math of the elementwise losses (BCE-with-logits, smooth L1, Huber, sigmoid
// focal loss), shared by the CPU and CUDA kernels.
//
// Every function is a template over V: a scalar (float/double, host or device) or a CPU
// vector (at::vec::Vectorized<float/double>). A backend provides the primitives for its V:
//   fl_exp, fl_abs, fl_max, fl_min, fl_sign, fl_where_ge0(c, a, b) = c >= 0 ? a : b,
//   fl_where_lt(c, d, a, b) = c < d ? a : b, fl_where_le(c, d, a, b) = c <= d ? a : b,
//   fl_pow(x, p) with p a scalar, and fl_log1p_01(x): log1p for x in [0, 1] or NaN only (the
//   losses take it of exp(-|x|)), where a backend may use a cheaper form (a few float eps).
// fl_exp and fl_log1p_01 must return NaN for NaN, as std::exp does.
// The scalar primitives are defined here; csrc/cpu/vec_math.h declares the vector ones and
// must be included before this header (unqualified calls in templates see the overloads
// declared before them).
#pragma once

#include <cmath>

#include "fused_loss/cross_entropy_math.h"  // FL_HOST_DEVICE

namespace fused_loss {

// --- scalar primitives ---------------------------------------------------------------------
template <typename S>
FL_HOST_DEVICE S fl_exp(S x) { return std::exp(x); }
template <typename S>
FL_HOST_DEVICE S fl_log1p_01(S x) { return std::log1p(x); }
template <typename S>
FL_HOST_DEVICE S fl_abs(S x) { return x < S(0) ? -x : x; }
template <typename S>
FL_HOST_DEVICE S fl_max(S a, S b) { return a < b ? b : a; }
template <typename S>
FL_HOST_DEVICE S fl_min(S a, S b) { return b < a ? b : a; }
template <typename S>
FL_HOST_DEVICE S fl_sign(S x) { return S((S(0) < x) - (x < S(0))); }
template <typename S>
FL_HOST_DEVICE S fl_where_ge0(S c, S a, S b) { return c >= S(0) ? a : b; }
template <typename S>
FL_HOST_DEVICE S fl_where_lt(S c, S d, S a, S b) { return c < d ? a : b; }
template <typename S>
FL_HOST_DEVICE S fl_where_le(S c, S d, S a, S b) { return c <= d ? a : b; }
template <typename S, typename P>
FL_HOST_DEVICE S fl_pow(S x, P p) { return std::pow(x, S(p)); }

// Inputs of one element: logit or prediction x, target y, and up to two broadcast operands
// (BCE: weight w and pos_weight pw; the others: weight w only, 1 when absent).
template <typename V>
struct ElemArgs {
  V x, y, w, pw;
};

// Each loss below has loss(args), grad_input(args) and grad_target(args): the per-element
// value and derivatives, before the upstream gradient is applied. Separate derivatives let a
// backward that needs only one of them skip the other's work (calls to exp/log1p cannot be
// removed by the compiler once computed). A pair computed together uses ElemGrads.
// loss_and_grad(args) gives the loss and d loss / d x in one evaluation (the forward that
// writes the gradient in its pass), sharing the transcendental work; each of its results has
// the bits of loss() and grad_input() (the same expressions on the same shared terms).
template <typename V>
struct ElemGrads {
  V dx, dy;
};

template <typename V>
struct ElemLossGrad {
  V loss, dx;
};

// --- BCE with logits -------------------------------------------------------------------------
// loss = (1 - y) x + lw * softplus(-x),  lw = 1 + (pw - 1) y,  softplus(-x) = -log(sigmoid(x))
//      = log1p(exp(-|x|)) + max(-x, 0)   (stable for any x)
// d/dx = (1 - y) - lw * sigmoid(-x),     d/dy = -x + (pw - 1) * softplus(-x)
// pw is 1 without pos_weight. One exp serves the loss and both gradients. d/dy is evaluated as
// (x >= 0 ? -x : -pw x) + (pw - 1) log1p(exp(-|x|)), which has no inf - inf at x = -inf.
struct BceWithLogits {
  bool has_pos_weight;  // without one, d/dy = -x exactly (no 0 * inf at infinite logits)

  // e = exp(-|x|): the one exp that the loss and d/dx share.
  template <typename V>
  FL_HOST_DEVICE static V exp_neg_abs(V x) { return fl_exp(V(0) - fl_abs(x)); }
  template <typename V>
  FL_HOST_DEVICE static V loss_from(const ElemArgs<V>& a, V e) {
    const V sp = fl_log1p_01(e) + fl_max(V(0) - a.x, V(0));
    const V lw = V(1) + (a.pw - V(1)) * a.y;
    return a.w * ((V(1) - a.y) * a.x + lw * sp);
  }
  template <typename V>
  FL_HOST_DEVICE static V grad_input_from(const ElemArgs<V>& a, V e) {
    const V sig_neg = fl_where_ge0(a.x, e, V(1)) / (V(1) + e);  // sigmoid(-x)
    const V lw = V(1) + (a.pw - V(1)) * a.y;
    return a.w * ((V(1) - a.y) - lw * sig_neg);
  }
  template <typename V>
  FL_HOST_DEVICE V loss(const ElemArgs<V>& a) const { return loss_from(a, exp_neg_abs(a.x)); }
  template <typename V>
  FL_HOST_DEVICE V grad_input(const ElemArgs<V>& a) const { return grad_input_from(a, exp_neg_abs(a.x)); }
  template <typename V>
  FL_HOST_DEVICE ElemLossGrad<V> loss_and_grad(const ElemArgs<V>& a) const {
    const V e = exp_neg_abs(a.x);
    return {loss_from(a, e), grad_input_from(a, e)};
  }
  template <typename V>
  FL_HOST_DEVICE V grad_target(const ElemArgs<V>& a) const {
    if (!has_pos_weight) return a.w * (V(0) - a.x);
    const V l = fl_log1p_01(exp_neg_abs(a.x));
    return a.w * (fl_where_ge0(a.x, V(0) - a.x, V(0) - a.pw * a.x) + (a.pw - V(1)) * l);
  }
};

// --- smooth L1 and Huber ---------------------------------------------------------------------
// d = x - y. Smooth L1: |d| < beta ? d^2 / (2 beta) : |d| - beta / 2; beta = 0 is L1, whose
// gradient is sign(d) (0 at d = 0, and at NaN as torch's sign), with no division by beta.
// Huber: |d| < delta ? d^2 / 2 : delta (|d| - delta / 2) = beta * smooth L1 with beta = delta.
// Their gradients are written as torch's: d <= -beta ? -1 : d >= beta ? 1 : d / beta, so that a
// NaN difference gives a NaN gradient (and a beta that rounds to 0 in float gives torch's +1 at d = 0).
struct SmoothL1 {
  double beta;
  double inv_beta;  // 1 / beta when x / beta == x * (1 / beta) exactly, else 0

  // Exact when beta is a power of two whose inverse is a normal float too (2^-140 is a
  // float, but its inverse overflows).
  static SmoothL1 with_beta(double beta) {
    int e = 0;
    const bool pow2 = beta > 0 && std::frexp(beta, &e) == 0.5 && std::abs(e) < 100;
    return {beta, pow2 ? 1.0 / beta : 0.0};
  }
  // x / beta without a divide per element where that gives the same bits (the default 1 included).
  template <typename V>
  FL_HOST_DEVICE V over_beta(V v) const {
    return inv_beta != 0.0 ? v * V(inv_beta) : v / V(beta);
  }
  template <typename V>
  FL_HOST_DEVICE V loss(const ElemArgs<V>& a) const {
    const V d = a.x - a.y, ad = fl_abs(d);
    if (beta == 0.0) return a.w * ad;
    return a.w * fl_where_lt(ad, V(beta), over_beta(V(0.5) * d * d), ad - V(0.5 * beta));
  }
  template <typename V>
  FL_HOST_DEVICE V grad_input(const ElemArgs<V>& a) const {
    const V d = a.x - a.y;
    if (beta == 0.0) return a.w * fl_sign(d);
    const V b(beta);
    return a.w * fl_where_le(d, V(0) - b, V(-1), fl_where_le(b, d, V(1), over_beta(d)));
  }
  template <typename V>
  FL_HOST_DEVICE ElemLossGrad<V> loss_and_grad(const ElemArgs<V>& a) const { return {loss(a), grad_input(a)}; }
  template <typename V>
  FL_HOST_DEVICE V grad_target(const ElemArgs<V>& a) const { return V(0) - grad_input(a); }
};

struct Huber {
  double delta;
  template <typename V>
  FL_HOST_DEVICE V loss(const ElemArgs<V>& a) const {
    const V d = a.x - a.y, ad = fl_abs(d);
    return a.w * fl_where_lt(ad, V(delta), V(0.5) * d * d, V(delta) * (ad - V(0.5 * delta)));
  }
  template <typename V>
  FL_HOST_DEVICE V grad_input(const ElemArgs<V>& a) const {
    const V d = a.x - a.y, dl(delta);
    return a.w * fl_where_le(d, V(0) - dl, V(0) - dl, fl_where_le(dl, d, dl, d));
  }
  template <typename V>
  FL_HOST_DEVICE ElemLossGrad<V> loss_and_grad(const ElemArgs<V>& a) const { return {loss(a), grad_input(a)}; }
  template <typename V>
  FL_HOST_DEVICE V grad_target(const ElemArgs<V>& a) const { return V(0) - grad_input(a); }
};

// --- sigmoid focal loss (torchvision.ops.sigmoid_focal_loss) ------------------------------------
// s = sigmoid(x), ce = BCE-with-logits(x, y), p_t = s y + (1 - s)(1 - y), m = 1 - p_t,
// loss = a_t ce m^gamma with a_t = alpha y + (1 - alpha)(1 - y) when alpha >= 0, else 1.
// Gradients follow torch autograd of that formula, including d(m^gamma)/dm = 0 for gamma = 0,
// where torch's pow backward drops the whole term (so an infinite ce adds no NaN).
struct SigmoidFocal {
  double alpha, gamma;

  template <typename V>
  FL_HOST_DEVICE V pow_gamma(V m) const {
    if (gamma == 2.0) return m * m;  // the common case, exact and cheap
    if (gamma == 0.0) return V(1);
    return fl_pow(m, gamma);
  }
  // d(m^gamma)/dm, as torch's pow backward: gamma * m^(gamma - 1), 0 when gamma == 0.
  template <typename V>
  FL_HOST_DEVICE V dpow_gamma(V m) const {
    if (gamma == 2.0) return V(2) * m;
    if (gamma == 0.0) return V(0);
    if (gamma == 1.0) return V(1);
    return V(gamma) * fl_pow(m, gamma - 1.0);
  }
  template <typename V>
  FL_HOST_DEVICE V alpha_t(V y) const {
    return alpha >= 0 ? V(alpha) * y + V(1 - alpha) * (V(1) - y) : V(1);
  }
  // The terms that the loss and both derivatives share: one exp and one log1p per element.
  template <typename V>
  struct Terms {
    V s, ce, m, at;  // sigmoid(x), BCE, 1 - p_t, alpha_t
  };
  template <typename V>
  FL_HOST_DEVICE Terms<V> terms(const ElemArgs<V>& a) const {
    const V e = fl_exp(V(0) - fl_abs(a.x));
    const V s = fl_where_ge0(a.x, V(1), e) / (V(1) + e);  // sigmoid(x)
    const V ce = (V(1) - a.y) * a.x + fl_log1p_01(e) + fl_max(V(0) - a.x, V(0));
    const V m = V(1) - (s * a.y + (V(1) - s) * (V(1) - a.y));
    return {s, ce, m, alpha_t(a.y)};
  }
  template <typename V>
  FL_HOST_DEVICE V loss_of(const Terms<V>& t, V mg) const { return t.at * t.ce * mg; }
  // dm/dx = -s (1 - s) (2y - 1);  dce/dx = s - y
  template <typename V>
  FL_HOST_DEVICE V dx_of(const ElemArgs<V>& a, const Terms<V>& t, V mg) const {
    if (gamma == 0.0) return t.at * (t.s - a.y);
    const V two_y_1 = V(2) * a.y - V(1);
    return t.at * ((t.s - a.y) * mg - t.ce * dpow_gamma(t.m) * t.s * (V(1) - t.s) * two_y_1);
  }
  template <typename V>
  FL_HOST_DEVICE V loss(const ElemArgs<V>& a) const {
    const Terms<V> t = terms(a);
    return loss_of(t, pow_gamma(t.m));
  }
  template <typename V>
  FL_HOST_DEVICE ElemLossGrad<V> loss_and_grad(const ElemArgs<V>& a) const {
    const Terms<V> t = terms(a);
    const V mg = pow_gamma(t.m);
    return {loss_of(t, mg), dx_of(a, t, mg)};
  }
  template <typename V>
  FL_HOST_DEVICE ElemGrads<V> grads(const ElemArgs<V>& a) const {
    const Terms<V> t = terms(a);
    const V mg = pow_gamma(t.m);
    // dm/dy = -(2s - 1);  dce/dy = -x
    const V dat = alpha >= 0 ? V(2 * alpha - 1) : V(0);
    if (gamma == 0.0) return {dx_of(a, t, mg), dat * t.ce + t.at * (V(0) - a.x)};
    const V two_s_1 = V(2) * t.s - V(1);
    const V dy = dat * t.ce * mg + t.at * ((V(0) - a.x) * mg - t.ce * dpow_gamma(t.m) * two_s_1);
    return {dx_of(a, t, mg), dy};
  }
  template <typename V>
  FL_HOST_DEVICE V grad_input(const ElemArgs<V>& a) const {
    const Terms<V> t = terms(a);
    return dx_of(a, t, pow_gamma(t.m));
  }
  template <typename V>
  FL_HOST_DEVICE V grad_target(const ElemArgs<V>& a) const { return grads(a).dy; }
};

}  // namespace fused_loss
