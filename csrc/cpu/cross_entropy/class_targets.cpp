// Cross-entropy with class-index targets on the CPU: log-softmax and NLL in one pass.
//
// Forward reads each row of logits once and keeps only its max and log-sum (2N floats,
// see RowLse) for the backward; backward reads the logits once more and writes
//   dx = softmax(x) * a - b * w - [c == y] * t_y
// directly. Nothing of size N x C is ever allocated besides the gradient itself.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "column_kernels.h"
#include "row_kernels.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {
namespace {

enum class Smooth { kNone, kUniform, kWeighted };

// The gradient of a class-index row, shared by the forward (which writes it in the pass that
// reads the row, for an upstream gradient of 1) and the backward: coefficients per row, and
// the line functor grad_chunk applies. grad_rows / grad_all: each row's share of the upstream
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
        if constexpr (S == Smooth::kWeighted) {
          const int64_t n = lanes_in<T>(cnt, k), cc = i + k * kLanes<T>;
          if (n > 0) o = o - vb * (n == kLanes<T> ? V::loadu(wc + cc) : V::loadu(wc + cc, n));
        }
        v[k] = o;
      }
      if (ty >= i && ty < i + cnt) sub_at<T>(v, ty - i, t_y);
      if constexpr (Logits::kShaped) {
        for (int k = 0; k < kVecsPerLine<T>; ++k) v[k] = v[k] * slope[k];
      }
    };
  }
};

// dx: where the gradient of the loss (upstream gradient grad_all for every row) is written
// in the same pass, or null for the loss alone. Only the row path (inner == 1) takes one, and
// shaped logits (the column path gets plain ones: see RowOptions).
template <typename T, Smooth S, typename Logits = PlainLogits<T>>
void class_forward_impl(const T* x, const int64_t* y, const std::vector<acc_t<T>>& w, const Geometry& g,
                        int64_t ignore_index, const CrossEntropyParams<acc_t<T>>& p, const RowStats<acc_t<T>>& stats,
                        acc_t<T>* loss, T* dx, acc_t<T> grad_all, const Logits& logits = {},
                        bool return_stats = false) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  auto w_of = [&](int64_t c) { return wp ? wp[c] : A(1); };
  auto finish_row = [&](int64_t row, A m, A s, A r, A sx, A z_y, int64_t yc) {
    const RowLse<A> l = row_lse(m, s);
    stats.set_lse(row, l);
    loss[row] = ce_class_row_loss(p, l, z_y, w_of(yc), r, sx);
    if (p.z_loss != A(0)) {
      const A z_term = ce_z_loss_row(p, l, w_of(yc));
      loss[row] += z_term;
      if (return_stats) stats.z_term()[row] = z_term;
    }
  };
  if (g.inner == 1) {
    auto skip = [&](int64_t row) { return y[row] == ignore_index; };
    auto finish = [&](int64_t row, const Partial<A>& pt, A r) {
      if (skip(row)) {
        loss[row] = A(0);  // its stats stay 0
        return;
      }
      const A z_y = logits.scalar(static_cast<A>(x[row * g.classes + y[row]]));
      finish_row(row, pt.m, pt.s, r, pt.lin, z_y, y[row]);
      if (return_stats) {
        // entropy = log_sum - h / s (see Partial); correct: the target's logit is the max
        // (a tie for the max counts as correct).
        stats.entropy()[row] = stats.log_sum()[row] - pt.h / pt.s;
        stats.correct()[row] = A(z_y == pt.m);
      }
    };
    auto run = [&](auto make_terms) {
      if (dx) {
        const ClassRowGrad<T, S, Logits> grad{y, wp, ignore_index, p, stats, nullptr, grad_all, logits};
        auto make_block = [&](int64_t row, int64_t c, A mb) { return grad.block(row, c, mb); };
        row_stats_and_grad<T>(x, dx, g.outer, g.classes, make_terms, skip, finish, make_block, logits);
      } else {
        row_stats<T>(x, g.outer, g.classes, make_terms, skip, finish, logits);
      }
    };
    if constexpr (S == Smooth::kNone) {
      run([](int64_t, int64_t) { return NoTerms<T>{}; });
    } else {
      run([&](int64_t, int64_t c0) { return SmoothingTerms<T, S == Smooth::kWeighted>{wp ? wp + c0 : nullptr}; });
    }
    return;
  }
  if constexpr (Logits::kShaped) {
    TORCH_CHECK(false, "fused_loss internal error: softcap, temperature and statistics reach the kernel for (N, C) "
                "input only");
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    const T* xb = x + n * g.classes * g.inner + j0;
    V vmax, vsum, r;
    CompensatedSum<A> vx;
    column_stats<T>(xb, g, nl, vmax, vsum, r, [&](int64_t c, const V& v, const V& rr) {
      if constexpr (S == Smooth::kUniform) vx.add(v - rr);
      if constexpr (S == Smooth::kWeighted) vx.add((v - rr) * V(wp[c]));
    });
    __at_align__ A am[kLanes<T>], as[kLanes<T>], ar[kLanes<T>], ax[kLanes<T>];
    vmax.store(am), vsum.store(as), r.store(ar), vx.value().store(ax);
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t row = n * g.inner + j0 + j;
      if (y[row] == ignore_index) {
        loss[row] = A(0);
      } else {
        finish_row(row, am[j], as[j], ar[j], ax[j], static_cast<A>(xb[y[row] * g.inner + j]), y[row]);
      }
    }
  });
}

template <typename T, Smooth S, typename Logits = PlainLogits<T>>
void class_backward_impl(const T* x, const int64_t* y, const std::vector<acc_t<T>>& w, const Geometry& g,
                         int64_t ignore_index, const CrossEntropyParams<acc_t<T>>& p, const RowStats<acc_t<T>>& stats,
                         const acc_t<T>* grad_rows, acc_t<T> grad_all, T* dx, const Logits& logits = {}) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  const ClassRowGrad<T, S, Logits> row_line{y, wp, ignore_index, p, stats, grad_rows, grad_all, logits};
  if (g.inner == 1) {
    row_block_grad<T>(
        x, dx, g.outer, g.classes, [&](int64_t row) { return row_line.ignored(row); },
        [&](int64_t row, int64_t c, A mb) { return row_line.block(row, c, mb); }, logits);
    return;
  }
  if constexpr (Logits::kShaped) {
    TORCH_CHECK(false, "fused_loss internal error: softcap and temperature reach the kernel for (N, C) input only");
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    // Lanes are rows; `zero` marks ignored rows and the lanes past the tile (their output
    // is 0 even where exp overflows). Targets are matched as integers, in class order:
    // (class, lane) pairs sorted by class, walked beside the class loop (a float compare
    // cannot tell classes apart above 2^24).
    __at_align__ A a[kLanes<T>] = {}, b[kLanes<T>] = {}, ty[kLanes<T>] = {}, m[kLanes<T>] = {},
                   zero[kLanes<T>];
    std::pair<int64_t, int64_t> targets[kLanes<T>];
    int64_t nt = 0;
    for (int64_t j = 0; j < kLanes<T>; ++j) {
      zero[j] = A(1);
      if (j >= nl) continue;
      const int64_t row = n * g.inner + j0 + j;
      if (y[row] == ignore_index) continue;
      const auto cf = row_line.coefs(row);
      a[j] = cf.a * softmax_scale(stats.log_sum()[row]), b[j] = cf.b, ty[j] = cf.t_y, zero[j] = A(0);
      m[j] = stats.max()[row];
      targets[nt++] = {y[row], j};
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
      if constexpr (S == Smooth::kWeighted) o = o - vb * V(wp[c]);
      o = V::blendv(o, V(0), zeroed);
      if (next < nt && targets[next].first == c) {
        __at_align__ A tmp[kLanes<T>];
        o.store(tmp);
        for (; next < nt && targets[next].first == c; ++next) tmp[targets[next].second] -= ty[targets[next].second];
        o = V::loadu(tmp);
      }
      store_vec(ob + c * g.inner, o, nl);
    }
  });
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

template <typename T, typename F>
void dispatch_logits(const RowOptions& o, F f) {
  if (o.return_stats) {
    f(ShapedLogits<T, true>::make(o.softcap, o.temperature));
  } else if (o.shaped()) {
    f(ShapedLogits<T, false>::make(o.softcap, o.temperature));
  } else {
    f(PlainLogits<T>{});
  }
}

// compute_grad: also return the gradient of the loss for an upstream gradient of 1, written
// in the pass that reads the logits (reductions 'mean' and 'sum' of (N, C) input; otherwise an
// empty tensor, and the backward recomputes). The backward then has nothing left to do.
// softcap, temperature, z_loss and return_stats: see RowOptions ((N, C) input only; z_loss
// also for (N, C, d...)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, bool compute_grad, std::optional<double> softcap, double temperature,
    double z_loss, bool return_stats) {
  check_input(input);
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, return_stats);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  TORCH_CHECK(!opts.shaped() || g.inner == 1, "fused_loss.cross_entropy: softcap, temperature and return_stats are "
              "fused for (N, C) input; fused_loss.cross_entropy composes them for other shapes");
  const at::Tensor y = class_targets(target, input, g, ignore_index);
  const at::Tensor x = input.contiguous();
  const auto acc = acc_type_of(input);
  at::Tensor stats = new_row_stats(opts.stats_parts(), g.rows(), input);
  at::Tensor rows = at::empty({g.rows()}, input.options().dtype(acc));
  const bool in_pass = compute_grad && in_pass_gradient(input, red);
  at::Tensor dx = in_pass ? new_like(input) : at::empty({0}, input.options());
  double denominator = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_forward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w, opts.z_loss);
    if (red == Reduction::Mean) denominator = class_mean_denominator(y.data_ptr<int64_t>(), g.rows(), w, ignore_index);
    dispatch_smooth(p.smooth, !w.empty(), [&](auto S) {
      dispatch_logits<scalar_t>(opts, [&](const auto& logits) {
        class_forward_impl<scalar_t, decltype(S)::value>(x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w, g,
                                                         ignore_index, p, RowStats<A>(stats), rows.data_ptr<A>(),
                                                         in_pass ? dx.data_ptr<scalar_t>() : nullptr,
                                                         A(1.0 / denominator), logits, opts.return_stats);
      });
    });
  });
  at::Tensor loss = reduce_loss(rows, red, denominator, target.sizes(), input);
  // No classes: torch's smoothing term is (its sum) * (eps / 0), NaN in every row, ignored or
  // not, and in the sum even of no rows.
  if (g.classes == 0 && label_smoothing > 0.0) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  return {loss, stats, dx};
}

// stats: the forward's first two parts (row maxima and log-sums).
at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                      int64_t reduction, int64_t ignore_index, double label_smoothing,
                                      std::optional<double> softcap, double temperature, double z_loss) {
  check_input(input);
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, false);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  TORCH_CHECK(!opts.shaped() || g.inner == 1, "fused_loss.cross_entropy: softcap and temperature are fused for "
              "(N, C) input; fused_loss.cross_entropy composes them for other shapes");
  const at::Tensor y = class_targets(target, input, g, ignore_index);
  const auto acc = acc_type_of(input);
  const at::Tensor st = check_stats(stats, "stats", 2, g, acc);
  const at::Tensor x = input.contiguous();
  at::Tensor dx = new_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w, opts.z_loss);
    const double denominator =
        red == Reduction::Mean ? class_mean_denominator(y.data_ptr<int64_t>(), g.rows(), w, ignore_index) : 1.0;
    const UpstreamGrad u = upstream_grad(grad_loss, red, g.rows(), acc, denominator);
    dispatch_smooth(p.smooth, !w.empty(), [&](auto S) {
      dispatch_logits<scalar_t>(opts, [&](const auto& logits) {
        class_backward_impl<scalar_t, decltype(S)::value>(
            x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w, g, ignore_index, p, RowStats<A>(st),
            u.rows.defined() ? u.rows.data_ptr<A>() : nullptr, A(u.all), dx.data_ptr<scalar_t>(), logits);
      });
    });
  });
  return dx;
}

}  // namespace
}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  using namespace fused_loss::cpu::ce;
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}
