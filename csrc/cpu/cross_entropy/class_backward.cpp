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
  } else {
    for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
      column_tile_grad(row_line, x, dx, g, n, j0, nl);
    });
  }
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
  check_options_layout(opts, g);
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

// On the CPU reading the upstream gradient costs nothing: the buffer is recomputed only when it
// is not exactly 1.
void cross_entropy_backward_into_cpu(at::Tensor& grad_input, const at::Tensor& grad_loss, const at::Tensor& input,
                                     const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& stats, int64_t reduction, int64_t ignore_index,
                                     double label_smoothing, std::optional<double> softcap, double temperature,
                                     double z_loss) {
  check_input(input);
  check_in_pass_buffer("cross_entropy", " backward_into", grad_input, grad_loss, input, reduction);
  if (grad_loss.item<double>() == 1.0) return;
  grad_input.copy_(cross_entropy_backward_cpu(grad_loss, input, target, weight, stats, reduction, ignore_index,
                                              label_smoothing, softcap, temperature, z_loss));
}

}  // namespace
}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  m.impl("cross_entropy_backward", &fused_loss::cpu::ce::cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_into", &fused_loss::cpu::ce::cross_entropy_backward_into_cpu);
}
