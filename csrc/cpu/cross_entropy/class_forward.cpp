// Cross-entropy with class-index targets on the CPU: the forward (see class_row_grad.h).
#include <torch/library.h>

#include "class_row_grad.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {
namespace {

// The column path (inner > 1) of class_forward_impl: each tile's stats, then, with dx, its
// gradient while the tile's C lines are still in cache.
template <typename T, Smooth S, typename FinishRow>
void column_forward(const T* x, const int64_t* y, const acc_t<T>* wp, const Geometry& g, int64_t ignore_index,
                    const CrossEntropyParams<acc_t<T>>& p, const RowStats<acc_t<T>>& stats, acc_t<T>* loss,
                    T* dx, acc_t<T> grad_all, FinishRow finish_row) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const ClassRowGrad<T, S> grad{y, wp, ignore_index, p, stats, nullptr, grad_all};
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
    if (dx) column_tile_grad(grad, x, dx, g, n, j0, nl);
  });
}

// dx: where the gradient of the loss (upstream gradient grad_all for every row) is written
// in the same pass, or null for the loss alone. Only the row path (inner == 1) takes shaped
// logits (the column path gets plain ones: see RowOptions).
template <typename T, Smooth S, typename Logits = PlainLogits<T>>
void class_forward_impl(const T* x, const int64_t* y, const std::vector<acc_t<T>>& w, const Geometry& g,
                        int64_t ignore_index, const CrossEntropyParams<acc_t<T>>& p, const RowStats<acc_t<T>>& stats,
                        acc_t<T>* loss, T* dx, acc_t<T> grad_all, const Logits& logits = {},
                        bool return_stats = false) {
  using A = acc_t<T>;
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
      const A x_y = static_cast<A>(x[row * g.classes + y[row]]), z_y = logits.scalar(x_y);
      finish_row(row, pt.m, pt.s, r, pt.lin, z_y, y[row]);
      if (return_stats) {
        // entropy = log_sum - h / s (see Partial); correct: the target's logit is the max,
        // compared before shaping (which keeps the order, but may round distinct logits to a
        // tie); a tie counts as correct.
        stats.entropy()[row] = stats.log_sum()[row] - pt.h / pt.s;
        stats.correct()[row] = A(x_y == pt.raw);
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
  } else {
    column_forward<T, S>(x, y, wp, g, ignore_index, p, stats, loss, dx, grad_all, finish_row);
  }
}

// The forward's work on contiguous logits x (the input's values): the loss and the row
// stats, and the gradient of the loss for an upstream gradient of 1 written to dx where it
// is defined: a new tensor, or x itself (in place: every path reads a row's logits, or the
// part of the row that its task owns, before it writes that part's gradient). acc_loss: the
// loss in the accumulation type (float32 for 16-bit logits) instead of the input's.
std::tuple<at::Tensor, at::Tensor> forward_into(const at::Tensor& x, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, Reduction red,
                                                int64_t ignore_index, double label_smoothing, const RowOptions& opts,
                                                const at::Tensor& dx, bool acc_loss = false) {
  const Geometry g = geometry(x);
  check_options_layout(opts, g);
  const at::Tensor y = class_targets(target, x, g, ignore_index);
  const auto acc = acc_type_of(x);
  at::Tensor stats = new_row_stats(opts.stats_parts(), g.rows(), x);
  at::Tensor rows = at::empty({g.rows()}, x.options().dtype(acc));
  double denominator = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_loss_cross_entropy_forward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, x, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w, opts.z_loss);
    if (red == Reduction::Mean) denominator = class_mean_denominator(y.data_ptr<int64_t>(), g.rows(), w, ignore_index);
    dispatch_smooth(p.smooth, !w.empty(), [&](auto S) {
      dispatch_logits<scalar_t, true>(opts, [&](const auto& logits) {
        class_forward_impl<scalar_t, decltype(S)::value>(x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w, g,
                                                         ignore_index, p, RowStats<A>(stats), rows.data_ptr<A>(),
                                                         dx.defined() ? dx.data_ptr<scalar_t>() : nullptr,
                                                         A(1.0 / denominator), logits, opts.return_stats);
      });
    });
  });
  // Reduced in double and rounded once, to the accumulation type (acc_loss) or the input's: the
  // dtype of the tensor given last.
  at::Tensor loss = reduce_loss(rows, red, denominator, target.sizes(), acc_loss ? rows : x);
  // No classes: torch's smoothing term is (its sum) * (eps / 0), NaN in every row, ignored or
  // not, and in the sum even of no rows.
  if (g.classes == 0 && label_smoothing > 0.0) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  return {loss, stats};
}

// compute_grad: also return the gradient of the loss for an upstream gradient of 1, written
// in the pass that reads the logits (reductions 'mean' and 'sum'; for 'none' an empty tensor,
// and the backward recomputes). The backward then has nothing left to do.
// softcap, temperature, z_loss and return_stats: see RowOptions ((N, C) input only; z_loss
// also for (N, C, d...)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, bool compute_grad, std::optional<double> softcap, double temperature,
    double z_loss, bool return_stats, bool acc_loss) {
  check_input(input);
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, return_stats);
  const Reduction red = to_reduction(reduction);
  const bool in_pass = compute_grad && in_pass_gradient(input, red);
  at::Tensor dx = in_pass ? new_like(input) : at::Tensor();
  auto [loss, stats] = forward_into(input.contiguous(), target, weight, red, ignore_index, label_smoothing, opts, dx,
                                    acc_loss);
  return {loss, stats, in_pass ? dx : at::empty({0}, input.options())};
}

// The same, for (N, C) logits that are not needed afterwards (linear cross-entropy's chunks):
// they are overwritten with the gradient of the loss for an upstream gradient of 1, so no
// buffer of their size is allocated. The loss comes in the accumulation type (a chunk's part
// of a larger sum is not rounded to 16 bits).
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_grad_in_place_cpu(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, std::optional<double> softcap, double temperature, double z_loss,
    bool return_stats) {
  check_input(input);
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, return_stats);
  const Reduction red = to_reduction(reduction);
  check_in_place(input, reduction);
  return forward_into(input, target, weight, red, ignore_index, label_smoothing, opts, input, true);
}

}  // namespace
}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  m.impl("cross_entropy_forward", &fused_loss::cpu::ce::cross_entropy_forward_cpu);
  m.impl("cross_entropy_forward_grad_in_place", &fused_loss::cpu::ce::cross_entropy_forward_grad_in_place_cpu);
}
