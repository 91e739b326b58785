// Cross-entropy with class-index targets on the CPU: log-softmax and NLL in one pass.
//
// Forward (class_forward.cpp) reads each row of logits once and keeps its max and log-sum
// (2N floats, see RowLse) for the backward, and writes the gradient in the same pass when it
// will be needed; backward (class_backward.cpp) reads the logits once more. Either writes
//   dx = softmax(z) * a - b * w - [c == y] * t_y      (times dz/dx for shaped logits)
// directly. Nothing of size N x C is ever allocated besides the gradient itself. This header
// holds what both share: the gradient of a row, and the dispatch on the options.
#pragma once

#include <ATen/Dispatch.h>

#include "column_kernels.h"
#include "row_kernels.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {

enum class Smooth { kNone, kUniform, kWeighted };

// The gradient of a class-index row, shared by the forward (which writes it in the pass that
// reads the row, for an upstream gradient of 1) and the backward: coefficients per row, and
// the line functor grad_blocks applies. grad_rows / grad_all: each row's share of the upstream
// gradient ('mean' already divided by its denominator); an ignored row gets 0.
// With shaped logits (softcap, temperature) the line functor maps x to z as it loads, and
// the chain rule multiplies the gradient with respect to z by dz/dx.
template <typename T, Smooth S, typename Logits = PlainLogits<T>>
struct ClassRowGrad {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const int64_t* y;
  const A* wp;  // class weights or null
  int64_t ignore_index;
  CrossEntropyParams<A> p;
  RowStats<A> stats;
  const A* grad_rows;
  A grad_all;
  Logits logits = {};

  bool ignored(int64_t row) const { return y[row] == ignore_index; }

  CrossEntropyClassGrad<A> coefs(int64_t row) const {
    if (ignored(row)) return {A(0), A(0), A(0)};
    auto cf = ce_class_grad_coefs(p, grad_rows ? grad_rows[row] : grad_all, wp ? wp[y[row]] : A(1), stats.lse(row));
    if (std::isnan(stats.log_sum()[row])) cf.a = stats.log_sum()[row];  // see row_lse
    return cf;
  }

  // make_block for grad_blocks: the line functor of the block at class c, whose max of z is mb.
  // Reads the row's stats, so call it after they are final.
  auto block(int64_t row, int64_t c, A mb) const {
    const auto cf = coefs(row);
    // p_c = e_c * exp(mb - max) / sum: the block's factor and the division folded into one
    // coefficient (see softmax_scale); an all -inf block has e = 0 and factor 0 (NaN in a NaN row).
    const A scale = cf.a * softmax_scale(stats.log_sum()[row]);
    const V vf(mb == kNegInf<A> ? scale * A(0) : std::exp(mb - stats.max()[row]) * scale), vb(cf.b);
    const A* wc = wp ? wp + c : nullptr;
    const int64_t ty = y[row] - c;  // target position within the block
    const A t_y = cf.t_y;
    return [=](int64_t i, V* v, const V* slope, int64_t cnt) {
      for (int k = 0; k < kVecsPerLine<T>; ++k) {
        V o = v[k] * vf;
        if constexpr (S == Smooth::kUniform) o = o - vb;
        if constexpr (S == Smooth::kWeighted) o = o - vb * load_class_values<T>(wc + i, k, cnt);
        v[k] = o;
      }
      if (ty >= i && ty < i + cnt) sub_at<T>(v, ty - i, t_y);
      if constexpr (Logits::kShaped) {
        for (int k = 0; k < kVecsPerLine<T>; ++k) v[k] = v[k] * slope[k];
      }
    };
  }
};

// The gradient of one column tile (inner > 1: kLanes rows of sample n from position j0, nl
// of them; see for_each_column_tile), written by the forward after the tile's stats are
// final (the tile's C lines still in cache) and by the backward.
template <typename T, Smooth S>
void column_tile_grad(const ClassRowGrad<T, S>& line, const T* x, T* dx, const Geometry& g, int64_t n, int64_t j0,
                      int64_t nl) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  // Lanes are rows; `zero` marks ignored rows and the lanes past the tile (their output
  // is 0 even where exp overflows). Targets are matched as integers, in class order:
  // (class, lane) pairs sorted by class, walked beside the class loop (a float compare
  // cannot tell classes apart above 2^24).
  __at_align__ A a[kLanes<T>] = {}, b[kLanes<T>] = {}, ty[kLanes<T>] = {}, m[kLanes<T>] = {}, zero[kLanes<T>];
  std::pair<int64_t, int64_t> targets[kLanes<T>];
  int64_t nt = 0;
  for (int64_t j = 0; j < kLanes<T>; ++j) {
    zero[j] = A(1);
    if (j >= nl) continue;
    const int64_t row = n * g.inner + j0 + j;
    if (line.ignored(row)) continue;
    const auto cf = line.coefs(row);
    a[j] = cf.a * softmax_scale(line.stats.log_sum()[row]), b[j] = cf.b, ty[j] = cf.t_y, zero[j] = A(0);
    m[j] = line.stats.max()[row];
    targets[nt++] = {line.y[row], j};
  }
  std::sort(targets, targets + nt);
  const V va = V::loadu(a), vb = V::loadu(b), vm = V::loadu(m);
  const V zeroed = V::loadu(zero) != V(0);
  const T* xb = x + n * g.classes * g.inner + j0;
  T* ob = dx + n * g.classes * g.inner + j0;
  int64_t next = 0;  // next target pair to apply
  for (int64_t c = 0; c < g.classes; ++c) {
    const V v = load_vec(xb + c * g.inner, nl);
    V o = (v - vm).exp_u20() * va;
    if constexpr (S == Smooth::kUniform) o = o - vb;
    if constexpr (S == Smooth::kWeighted) o = o - vb * V(line.wp[c]);
    o = V::blendv(o, V(0), zeroed);
    if (next < nt && targets[next].first == c) {
      __at_align__ A tmp[kLanes<T>];
      o.store(tmp);
      for (; next < nt && targets[next].first == c; ++next) tmp[targets[next].second] -= ty[targets[next].second];
      o = V::loadu(tmp);
    }
    store_vec(ob + c * g.inner, o, nl);
  }
}

// ---------------------------------------------------------------------------------
// Operator entry points

template <typename F>
void dispatch_smooth(bool smooth, bool weighted, F f) {
  if (!smooth) {
    f(std::integral_constant<Smooth, Smooth::kNone>{});
  } else if (weighted) {
    f(std::integral_constant<Smooth, Smooth::kWeighted>{});
  } else {
    f(std::integral_constant<Smooth, Smooth::kUniform>{});
  }
}

// kWithStats: whether the caller may ask for statistics (the forward; the backward never does,
// and so instantiates no entropy variant).
template <typename T, bool kWithStats, typename F>
void dispatch_logits(const RowOptions& o, F f) {
  if (kWithStats && o.return_stats) {
    f(ShapedLogits<T, true>::make(o.softcap, o.temperature));
  } else if (o.shaped()) {
    f(ShapedLogits<T, false>::make(o.softcap, o.temperature));
  } else {
    f(PlainLogits<T>{});
  }
}

}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu
