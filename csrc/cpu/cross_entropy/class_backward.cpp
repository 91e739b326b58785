// Cross-entropy with class-index targets on the CPU: the backward (see class_row_grad.h).
#include <torch/library.h>

#include "class_row_grad.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {
namespace {

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
      dispatch_logits<scalar_t, false>(opts, [&](const auto& logits) {
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
  m.impl("cross_entropy_backward", &fused_loss::cpu::ce::cross_entropy_backward_cpu);
}
