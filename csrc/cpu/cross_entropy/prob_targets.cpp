// Cross-entropy with probability targets (the input's shape) on the CPU: one pass for the
// loss, one for the gradients of input and target.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "column_kernels.h"
#include "row_kernels.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {
namespace {

constexpr int kSwt = 2;  // the part of the row stats holding sum_c w_c t'_c

// The input's gradient of a probability-target row, dx_c = g (p_c S - w_c t'_c) with
// S = sum_c w_c t'_c, shared by the forward (written in the pass that reads the row, for an
// upstream gradient grad_all) and the backward. As for class-index targets (see grad_blocks),
// p_c = e_c * exp(mb - max) / sum from block-relative exponentials e_c on every path, so
// the bits do not depend on the path.
template <typename T, bool kWeighted>
struct ProbRowGrad {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const T* t;
  const A* wp;  // class weights or null
  int64_t classes;
  A ome, eps_over_c;  // 1 - eps and eps / C of the smoothed target
  RowStats<A> stats;
  const A* grad_rows;
  A grad_all;

  A grad_of(int64_t row) const { return grad_rows ? grad_rows[row] : grad_all; }
  // g S / sum (NaN in a NaN row: see row_lse)
  A scale(int64_t row) const {
    const A ls = stats.log_sum()[row];
    return std::isnan(ls) ? ls : grad_of(row) * stats.part(kSwt)[row] * softmax_scale(ls);
  }

  // make_block for grad_blocks: the line functor of the block at class c whose max is mb.
  auto block(int64_t row, int64_t c, A mb) const {
    const A gs = scale(row);
    const V vf(mb == kNegInf<A> ? gs * A(0) : std::exp(mb - stats.max()[row]) * gs);
    const V vg(grad_of(row)), vome(ome), veps(eps_over_c);
    const A* wc = wp ? wp + c : nullptr;
    const T* tc = t + row * classes + c;
    return [=](int64_t i, V* v, const V*, int64_t cnt) {
      V tv[kVecsPerLine<T>];
      load_line_n(tc + i, tv, cnt);
      for (int k = 0; k < kVecsPerLine<T>; ++k) {
        V wt = ce_smoothed_target(tv[k], vome, veps);
        if constexpr (kWeighted) wt = wt * load_class_values<T>(wc + i, k, cnt);
        v[k] = v[k] * vf - vg * wt;
      }
    };
  }

  // The gradients of one column tile (inner > 1; see for_each_column_tile): the input's
  // into dx and the target's, dt_c = g (1 - eps) w_c (lse - x_c), into dt (either may be null).
  void column_tile(const T* x, T* dx, T* dt, const Geometry& g, int64_t n, int64_t j0, int64_t nl) const {
    __at_align__ A gl[kLanes<T>] = {}, gs[kLanes<T>] = {}, m[kLanes<T>] = {}, l[kLanes<T>] = {};
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t row = n * g.inner + j0 + j;
      gl[j] = grad_of(row), gs[j] = scale(row), m[j] = stats.max()[row], l[j] = stats.log_sum()[row];
    }
    const V vg = V::loadu(gl), vgs = V::loadu(gs), vm = V::loadu(m), vls = V::loadu(l), vgo = vg * V(ome);
    const int64_t base = n * g.classes * g.inner + j0;
    for (int64_t c = 0; c < g.classes; ++c) {
      const int64_t off = base + c * g.inner;
      const V v = load_vec(x + off, nl);
      const V wv(wp ? wp[c] : A(1));
      if (dx) {
        const V wt = ce_smoothed_target(load_vec(t + off, nl), V(ome), V(eps_over_c)) * wv;
        store_vec(dx + off, (v - vm).exp_u20() * vgs - vg * wt, nl);
      }
      if (dt) store_vec(dt + off, vgo * wv * ((vm - v) + vls), nl);
    }
  }
};

// dx: where the input's gradient (upstream gradient grad_all) is written in the same pass,
// or null for the loss alone.
template <typename T, bool kWeighted>
void prob_forward_impl(const T* x, const T* t, const std::vector<acc_t<T>>& w, const Geometry& g,
                       const CrossEntropyParams<acc_t<T>>& p, const RowStats<acc_t<T>>& stats, acc_t<T>* loss,
                       T* dx, acc_t<T> grad_all) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  const A ome = A(1) - p.eps;
  const ProbRowGrad<T, kWeighted> grad{t, wp, g.classes, ome, p.eps_over_c, stats, nullptr, grad_all};
  auto finish_row = [&](int64_t row, A m, A s, A r, A swt, A swtx) {
    const RowLse<A> l = row_lse(m, s);
    stats.set_lse(row, l);
    stats.part(kSwt)[row] = swt;
    loss[row] = ce_prob_row_loss(l, r, swt, swtx);
  };
  if (g.inner == 1) {
    auto make_terms = [&](int64_t row, int64_t c0) {
      return ProbTerms<T, kWeighted>{wp ? wp + c0 : nullptr, t + row * g.classes + c0, ome, p.eps_over_c};
    };
    auto never = [](int64_t) { return false; };
    auto finish = [&](int64_t row, const Partial<A>& pt, A r) { finish_row(row, pt.m, pt.s, r, pt.mass, pt.lin); };
    if (dx) {
      auto make_block = [&](int64_t row, int64_t c, A mb) { return grad.block(row, c, mb); };
      row_stats_and_grad<T>(x, dx, g.outer, g.classes, make_terms, never, finish, make_block);
    } else {
      row_stats<T>(x, g.outer, g.classes, make_terms, never, finish);
    }
    return;
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    const int64_t off = n * g.classes * g.inner + j0;
    V vmax, vsum, r, vswt(0);
    CompensatedSum<A> vswtx;
    column_stats<T>(x + off, g, nl, vmax, vsum, r, [&](int64_t c, const V& v, const V& rr) {
      V wt = ce_smoothed_target(load_vec(t + off + c * g.inner, nl), V(ome), V(p.eps_over_c));
      if constexpr (kWeighted) wt = wt * V(wp[c]);
      vswt += wt;
      vswtx.add(wt * (v - rr));
    });
    __at_align__ A am[kLanes<T>], as[kLanes<T>], ar[kLanes<T>], a1[kLanes<T>], a2[kLanes<T>];
    vmax.store(am), vsum.store(as), r.store(ar), vswt.store(a1), vswtx.value().store(a2);
    for (int64_t j = 0; j < nl; ++j) finish_row(n * g.inner + j0 + j, am[j], as[j], ar[j], a1[j], a2[j]);
    if (dx) grad.column_tile(x, dx, nullptr, g, n, j0, nl);  // the tile's lines still in cache
  });
}

// The target's gradient dt_c = g (1 - eps) w_c (lse - x_c) of the line at class c + i of a
// row, from the raw logits (in cache where the input's gradient has just read them).
template <typename T, bool kWeighted>
struct ProbTargetLine {
  using A = acc_t<T>;
  using V = AccVec<T>;
  V go, m, ls;  // g (1 - eps), the row's max and log-sum
  const A* wc = nullptr;  // class weights from c, or null
  const T* xc = nullptr;  // the row's logits from c

  void operator()(int64_t i, V* out, int64_t cnt) const {
    V v[kVecsPerLine<T>];
    load_line_n(xc + i, v, cnt);
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      V wv(1);
      if constexpr (kWeighted) wv = load_class_values<T>(wc + i, k, cnt);
      out[k] = go * wv * ((m - v[k]) + ls);
    }
  }
};

// dx_c = g (p_c S - w_c t'_c),  dt_c = g (1 - eps) w_c (lse - x_c): see ProbRowGrad.
template <typename T, bool kWeighted>
void prob_backward_impl(const T* x, const T* t, const std::vector<acc_t<T>>& w, const Geometry& g,
                        const CrossEntropyParams<acc_t<T>>& p, const RowStats<acc_t<T>>& stats,
                        const acc_t<T>* grad_rows, acc_t<T> grad_all, T* dx, T* dt) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  const A ome = A(1) - p.eps;
  const ProbRowGrad<T, kWeighted> grad{t, wp, g.classes, ome, p.eps_over_c, stats, grad_rows, grad_all};
  if (g.inner != 1) {
    for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) { grad.column_tile(x, dx, dt, g, n, j0, nl); });
    return;
  }
  auto target_line = [&](int64_t row, int64_t c) {
    return ProbTargetLine<T, kWeighted>{V(grad.grad_of(row) * ome), V(stats.max()[row]), V(stats.log_sum()[row]),
                                        wp ? wp + c : nullptr, x + row * g.classes + c};
  };
  auto never = [](int64_t) { return false; };
  if (dx) {
    // One pass writes both: the input's gradient block by block, the target's beside it.
    row_block_grad<T>(x, dx, g.outer, g.classes, never, [&](int64_t row, int64_t c, A mb) {
      auto line = grad.block(row, c, mb);
      const auto tline = dt ? target_line(row, c) : ProbTargetLine<T, kWeighted>{};
      T* dtc = dt ? dt + row * g.classes + c : nullptr;
      return [=](int64_t i, V* v, const V* slope, int64_t cnt) {
        if (dtc) {
          V gt[kVecsPerLine<T>];
          tline(i, gt, cnt);
          store_or_stream(dtc + i, gt, cnt);
        }
        line(i, v, slope, cnt);
      };
    }, PlainLogits<T>{});
  } else {
    // The target's alone (the input needs none): its lines replace the exponentials.
    row_block_grad<T>(x, dt, g.outer, g.classes, never, [&](int64_t row, int64_t c, A) {
      const auto tline = target_line(row, c);
      return [=](int64_t i, V* v, const V*, int64_t cnt) { tline(i, v, cnt); };
    }, PlainLogits<T>{});
  }
}

// ---------------------------------------------------------------------------------
// Operator entry points


// compute_grad: also return the input's gradient for an upstream gradient of 1, written in the
// pass that reads the logits ('mean' and 'sum'; otherwise an empty tensor, and the backward
// recomputes). The target's gradient is always left to the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    double label_smoothing, bool compute_grad) {
  check_input(input);
  check_smoothing(label_smoothing);
  check_prob_target(input, target);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  const auto acc = acc_type_of(input);
  at::Tensor stats = new_row_stats(3, g.rows(), input);
  // A row of no classes has the loss -(empty sum) = -0, as torch's.
  at::Tensor rows = at::full({g.rows()}, -0.0, input.options().dtype(acc));
  const bool in_pass = compute_grad && in_pass_gradient(input, red);
  at::Tensor dx = in_pass ? new_like(input) : at::empty({0}, input.options());
  // 'mean' averages over rows, whatever the weights (torch's rule for probability targets);
  // torch's 'mean' of an empty input is NaN, also when it has rows but no classes.
  const double denominator = input.numel() == 0 ? 0.0 : double(g.rows());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_prob_forward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    if (g.classes == 0) return;
    const auto p = make_params<A>(label_smoothing, g.classes, w);
    dispatch_bool(!w.empty(), [&](auto W) {
      prob_forward_impl<scalar_t, decltype(W)::value>(
          x.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w, g, p, RowStats<A>(stats), rows.data_ptr<A>(),
          in_pass ? dx.data_ptr<scalar_t>() : nullptr, A(red == Reduction::Mean ? 1.0 / denominator : 1.0));
    });
  });
  return {reduce_loss(rows, red, denominator, row_shape(input), input), stats, dx};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t reduction,
    double label_smoothing, bool input_grad, bool target_grad) {
  check_input(input);
  check_smoothing(label_smoothing);
  check_prob_target(input, target);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const auto acc = acc_type_of(input);
  const at::Tensor st = check_stats(stats, "stats", 3, g, acc);
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  at::Tensor dx = input_grad ? new_like(input) : at::empty({0}, input.options());
  at::Tensor dt = target_grad ? new_like(target) : at::empty({0}, target.options());
  const UpstreamGrad u = upstream_grad(grad_loss, red, g.rows(), acc, double(g.rows()));
  if ((!input_grad && !target_grad) || input.numel() == 0) return {dx, dt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_prob_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w);
    dispatch_bool(!w.empty(), [&](auto W) {
      prob_backward_impl<scalar_t, decltype(W)::value>(
          x.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w, g, p, RowStats<A>(st),
          u.rows.defined() ? u.rows.data_ptr<A>() : nullptr, A(u.all),
          input_grad ? dx.data_ptr<scalar_t>() : nullptr, target_grad ? dt.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {dx, dt};
}

// On the CPU the upstream gradient is read on the host: the buffer is recomputed only when it is
// not exactly 1.
void cross_entropy_prob_backward_into_cpu(at::Tensor& grad_input, const at::Tensor& grad_loss,
                                          const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                          int64_t reduction, double label_smoothing) {
  check_input(input);
  check_in_pass_buffer("cross_entropy", " backward_into", grad_input, grad_loss, input, reduction);
  if (grad_loss.item<double>() == 1.0) return;
  grad_input.copy_(std::get<0>(cross_entropy_prob_backward_cpu(grad_loss, input, target, weight, stats, reduction,
                                                               label_smoothing, true, false)));
}

}  // namespace
}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  using namespace fused_loss::cpu::ce;
  m.impl("cross_entropy_prob_forward", &cross_entropy_prob_forward_cpu);
  m.impl("cross_entropy_prob_backward", &cross_entropy_prob_backward_cpu);
  m.impl("cross_entropy_prob_backward_into", &cross_entropy_prob_backward_into_cpu);
}
