// Cross-entropy on the CPU, shared by the class-index and probability-target kernels:
// shapes, argument checks, options, reductions and the upstream gradient.
//
// The input is viewed as (outer, C, inner): (N, C) has inner == 1 and its rows are
// contiguous ("row kernels", row_kernels.h, vectorised along the classes); (N, C, d1..dk)
// has inner = d1*..*dk and a sample's classes are inner apart ("column kernels",
// column_kernels.h, vectorised along the inner positions, one position per vector lane).
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "fused_loss/common.h"
#include "fused_loss/cross_entropy_args.h"
#include "fused_loss/cross_entropy_math.h"
#include "../output_cache.h"
#include "../vec_io.h"

// The gradient loops need GCC's flatten, or it stops inlining Vectorized::exp_u20 into them
// (a call per vector cost a third of the pass). The sanitizer build leaves it out: with ASan,
// flattened kernels took ten minutes to compile, for no difference in what is checked.
#ifdef FUSED_LOSS_SANITIZE
#define FL_FLATTEN
#else
#define FL_FLATTEN __attribute__((flatten))
#endif

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {

using namespace fused_loss::ce_args;  // Geometry, RowOptions and the argument checks

inline void check_input(const at::Tensor& input) { ce_args::check_input(input, c10::DeviceType::CPU, "CPU"); }

constexpr int64_t kBlock = 4096;        // classes kept in L1 between a block's two passes
constexpr int64_t kChunk = 8 * kBlock;  // classes per unit of parallel work within a row
constexpr int64_t kGrainElems = 32768;  // fewest elements worth a parallel task

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

template <typename A>
A exp_scalar(A v) { return std::exp(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tasks per at::parallel_for grain so that each grain covers about kGrainElems elements.
inline int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// ---------------------------------------------------------------------------------
// Shapes and argument checks

// Class weights as a contiguous vector in the accumulation type (empty when absent).
template <typename A>
std::vector<A> class_weights(const std::optional<at::Tensor>& weight, const at::Tensor& input, int64_t classes) {
  check_class_weight(weight, input, classes);
  if (!weight.has_value() || !weight->defined()) return {};
  auto w = weight->contiguous().to(c10::CppTypeToScalarType<A>::value);
  const A* wp = w.template data_ptr<A>();
  return std::vector<A>(wp, wp + classes);
}

// Class-index targets as contiguous int64, every one checked before any kernel reads
// through it (a bad target must raise, never index out of bounds).
inline at::Tensor class_targets(const at::Tensor& target, const at::Tensor& input, const Geometry& g, int64_t ignore_index) {
  check_class_target(target, input, g);
  auto y = target.to(at::kLong).contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  const int64_t n = y.numel();
  // Find the first bad target in index order, whatever the thread count.
  const int64_t first_bad = at::parallel_reduce(
      0, n, 1 << 16, n,
      [&](int64_t b, int64_t e, int64_t ident) {
        for (int64_t i = b; i < e; ++i) {
          if (yp[i] != ignore_index && (yp[i] < 0 || yp[i] >= g.classes)) return i;
        }
        return ident;
      },
      [](int64_t a, int64_t b) { return std::min(a, b); });
  TORCH_CHECK_INDEX(first_bad == n, "Target ", first_bad < n ? yp[first_bad] : 0,
                    " is out of bounds: expected a class index in [0, ", g.classes, ") or ignore_index (",
                    ignore_index, ")");
  return y;
}

template <typename A>
CrossEntropyParams<A> make_params(double label_smoothing, int64_t classes, const std::vector<A>& w,
                                  double z_loss = 0.0) {
  CrossEntropyParams<A> p;
  p.z_loss = A(z_loss);
  p.smooth = label_smoothing > 0.0;  // torch applies no smoothing for values <= 0
  p.eps = p.smooth ? A(label_smoothing) : A(0);
  p.eps_over_c = p.smooth ? A(label_smoothing / double(classes)) : A(0);
  double ws = double(classes);
  if (!w.empty()) {
    ws = 0;
    for (A v : w) ws += v;
  }
  p.w_sum = A(ws);
  return p;
}

// A row's log-sum-exp from its max m and sum s of exp(x - m). A row whose max is not
// finite (it holds NaN or +inf, or all its logits are -inf) or whose sum is NaN gets a NaN
// log_sum, as torch's log_softmax gives NaN there; the backward turns it into NaN
// gradients explicitly, because exp_u20 clamps NaN arguments instead of propagating them.
template <typename A>
RowLse<A> row_lse(A m, A s) {
  if (!std::isfinite(m) || std::isnan(s)) return {m, std::numeric_limits<A>::quiet_NaN()};
  return {m, std::log(s)};
}

// Whether a forward asked for the gradient writes it in its own pass: a reduced loss. For 'none'
// the upstream gradient differs per row, and scaling a stored gradient would cost a pass more
// than recomputing it from the logits.
inline bool in_pass_gradient(const at::Tensor& input, Reduction red) {
  return input.dim() >= 2 && red != Reduction::None;
}

// 1 / sum_c exp(x_c - max) = exp(-log_sum): softmax(x)_c = exp(x_c - max) * softmax_scale.
// One rounding of the scale and one product, where exp((x - max) - log_sum) would round
// (x - max) - log_sum at the ulp of |x - max| and carry that into the exponent: this is
// better conditioned than torch's exp(log_softmax), and costs no operation per element more
// than an absolute lse did.
template <typename A>
A softmax_scale(A log_sum) { return std::exp(-log_sum); }

// Per-row statistics kept from the forward for the backward: a contiguous (parts, rows)
// tensor in the accumulation type A whose first two parts are the row maxima and
// log-sums (see RowLse); probability targets add a third.
template <typename A>
struct RowStats {
  A* data;
  int64_t rows;
  explicit RowStats(const at::Tensor& t) : data(t.data_ptr<A>()), rows(t.size(1)) {}
  A* part(int k) const { return data + k * rows; }
  A* max() const { return part(0); }
  A* log_sum() const { return part(1); }
  // Parts 2.. when the forward returns statistics (class-index targets; see RowOptions).
  A* entropy() const { return part(2); }
  A* correct() const { return part(3); }
  A* z_term() const { return part(4); }
  RowLse<A> lse(int64_t row) const { return {data[row], data[rows + row]}; }
  void set_lse(int64_t row, const RowLse<A>& l) const {
    data[row] = l.max;
    data[rows + row] = l.log_sum;
  }
};

inline at::Tensor new_row_stats(int64_t parts, int64_t rows, const at::Tensor& input) {
  return at::zeros({parts, rows}, input.options().dtype(at::toOpMathType(input.scalar_type())));
}

// The shift of a row's (or a part's) linear sums: its max when finite, else 0.
template <typename A>
A shift_of(A m) { return std::isfinite(m) ? m : A(0); }

// ---------------------------------------------------------------------------------
// Entry-point helpers

template <typename F>
void dispatch_bool(bool b, F f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

inline at::ScalarType acc_type_of(const at::Tensor& input) { return at::toOpMathType(input.scalar_type()); }

// An output of the input's shape, contiguous; large ones come from the output cache.
inline at::Tensor new_like(const at::Tensor& input) { return empty_cached(input.sizes(), input.options()); }

// Sum of per-row losses in row order (deterministic), in double.
template <typename A>
double sum_rows(const A* v, int64_t n) {
  double s = -0.0;  // the additive identity: a sum of -0 terms stays -0, as torch's
  for (int64_t i = 0; i < n; ++i) s += double(v[i]);
  return s;
}

// 'mean' divides by the summed weight of the non-ignored targets (their count unweighted).
// A zero total gives NaN, loss and gradients, as torch's nll_loss (0 / 0) even where the
// smoothing part alone would be finite.
template <typename A>
double class_mean_denominator(const int64_t* y, int64_t n, const std::vector<A>& w, int64_t ignore_index) {
  double d = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] != ignore_index) d += w.empty() ? 1.0 : double(w[y[i]]);
  }
  return d == 0.0 ? std::numeric_limits<double>::quiet_NaN() : d;
}

// Reduced loss from per-row losses: 'none' keeps the rows in `shape`, the others a scalar.
inline at::Tensor reduce_loss(const at::Tensor& rows, Reduction red, double denominator, at::IntArrayRef shape,
                       const at::Tensor& input) {
  if (red == Reduction::None) return rows.view(shape).to(input.scalar_type());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fused_loss_sum_rows",
                             [&] { total = sum_rows(rows.data_ptr<scalar_t>(), rows.numel()); });
  if (red == Reduction::Mean) total /= denominator;  // 0 / 0 is NaN, as in torch
  return at::scalar_tensor(total, input.options());
}

// The upstream gradient: one per row ('none') or one for all rows, already divided by
// the 'mean' denominator.
struct UpstreamGrad {
  at::Tensor rows;  // acc type, contiguous, or undefined
  double all = 0;
};

inline UpstreamGrad upstream_grad(const at::Tensor& grad_loss, Reduction red, int64_t rows, at::ScalarType acc,
                           double denominator) {
  UpstreamGrad u;
  check_upstream(grad_loss, red, rows);
  if (red == Reduction::None) {
    u.rows = grad_loss.reshape(-1).to(acc).contiguous();
  } else {
    u.all = grad_loss.item<double>();
    if (red == Reduction::Mean) u.all /= denominator;
  }
  return u;
}

}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu
