// Cross-entropy with probability targets on CUDA: forward (with the input's gradient in the same
// pass) and backward (input and target gradients), with class weights and label smoothing (the
// LLM options are composed around it by the Python layer, as on the CPU).
//
// Per row, with t'_c = (1 - eps) t_c + eps / C:  loss = (lse - r) sum_c w_c t'_c - sum_c w_c t'_c (x_c - r)
// (cross_entropy_math.h), gathered in one read of the logits and targets (RowAcc's linear terms
// with u_c = w_c t'_c); dx_c = g (softmax(x)_c sum_c w_c t'_c - w_c t'_c) and
// dt_c = g (1 - eps) w_c (lse - x_c). Rows are spread as for class targets (row_math.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_loss/cross_entropy_args.h"
#include "reduce.cuh"
#include "row_math.cuh"

namespace fused_loss::cuda::ce {
namespace {

using namespace fused_loss::ce_args;

constexpr int kSwt = 2;  // the part of the row stats holding sum_c w_c t'_c

template <typename T>
struct ProbArgs {
  using A = acc_t<T>;
  const T* x;
  const T* t;
  T* dx;  // the input's gradient to write, or null
  T* dt;  // the target's gradient to write (backward), or null
  const A* w;  // class weights (acc type) or null
  int64_t rows, classes, inner;
  A ome, eps_over_c;    // 1 - eps and eps / C of the smoothed target
  A* loss_rows;         // forward
  A* row_stats;         // forward: written (3 x rows); backward: read
  const A* grad_rows;   // backward 'none': each row's upstream gradient
  const double* grad_scalar;  // backward 'mean'/'sum': the upstream gradient (device), else null (forward: 1)
  double denominator;   // of 'mean' (else 1)
  bool skip_if_one;     // backward into the forward's buffer: nothing to do for an upstream of exactly 1

  __device__ __forceinline__ bool skip() const { return skip_if_one && grad_scalar[0] == 1.0; }

  __device__ __forceinline__ A weight(int64_t c) const { return w != nullptr ? w[c] : A(1); }
  __device__ __forceinline__ A smoothed(A t_c) const { return ce_smoothed_target(t_c, ome, eps_over_c); }
  __device__ __forceinline__ A upstream(int64_t row) const {
    if (grad_rows != nullptr) return grad_rows[row];
    return A((grad_scalar != nullptr ? grad_scalar[0] : 1.0) / denominator);
  }
};

template <typename T>
struct ProbAddTo {
  using A = acc_t<T>;
  RowAcc<A>& acc;
  const ProbArgs<T>& a;
  template <int N>
  __device__ __forceinline__ void add(int64_t c0, const T* xv, const T* tv) const {
    A z[N], u[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      z[k] = A(xv[k]);
      u[k] = a.smoothed(A(tv[k])) * a.weight(c0 + k);
    }
    acc.add(z, z, u);
  }
  __device__ __forceinline__ void operator()(int64_t c, T x, T t) const { add<1>(c, &x, &t); }
  __device__ __forceinline__ void operator()(int64_t c0, const Pack<T, kVec<T>>& x, const Pack<T, kVec<T>>& t) const {
    add<kVec<T>>(c0, x.v, t.v);
  }
};

// The gradients of one element, from the row's statistics and upstream gradient.
template <typename T>
struct ProbGrad {
  using A = acc_t<T>;
  ProbGrad() = default;
  A max, log_sum, g, gs, go;  // gs: g swt / sum (the softmax's coefficient), go: g (1 - eps)
  __device__ __forceinline__ ProbGrad(const ProbArgs<T>& a, int64_t row, A m, A ls, A swt) {
    max = m, log_sum = ls, g = a.upstream(row);
    gs = isnan(log_sum) ? log_sum : g * swt * acc_exp(-log_sum);
    go = g * a.ome;
  }
  // From the forward's statistics (the backward).
  __device__ __forceinline__ static ProbGrad from_stats(const ProbArgs<T>& a, int64_t row) {
    return ProbGrad(a, row, a.row_stats[row], a.row_stats[a.rows + row], a.row_stats[kSwt * a.rows + row]);
  }
  // From the row's reduced sums (the forward's in-pass gradient).
  __device__ __forceinline__ static ProbGrad from_sums(const ProbArgs<T>& a, int64_t row, const RowAcc<A>& acc) {
    const auto l = acc.lse();
    return ProbGrad(a, row, l.max, l.log_sum, acc.wsum);
  }
  __device__ __forceinline__ void write(const ProbArgs<T>& a, int64_t i, int64_t c, A x, A t) const {
    const A w = a.weight(c);
    if (a.dx != nullptr) a.dx[i] = static_cast<T>(acc_exp(x - max) * gs - g * a.smoothed(t) * w);
    if (a.dt != nullptr) a.dt[i] = static_cast<T>(go * w * ((max - x) + log_sum));
  }
};

template <typename T>
__device__ __forceinline__ void finish_prob_row(const ProbArgs<T>& a, int64_t row, const RowAcc<acc_t<T>>& acc) {
  const auto l = acc.lse();
  a.row_stats[row] = l.max;
  a.row_stats[a.rows + row] = l.log_sum;
  a.row_stats[kSwt * a.rows + row] = acc.wsum;
  a.loss_rows[row] = ce_prob_row_loss(l, shift_of(acc.m), acc.wsum, acc.lin);
}

template <typename T, Layout L, bool kBackward>
__global__ void __launch_bounds__(max_threads(L)) prob_rows_kernel(ProbArgs<T> a) {
  using A = acc_t<T>;
  __shared__ RowAcc<A> smem[32];
  if (kBackward && a.skip()) return;
  RowGroup g;
  int64_t row;
  if (!group_row<L>(a.rows, g, row)) return;
  const int64_t C = a.classes, off = row * C;
  ProbGrad<T> grad;
  if constexpr (!kBackward) {
    RowAcc<A> acc = RowAcc<A>::empty(false, true);
    const ProbAddTo<T> add{acc, a};
    for_row_pair(a.x + off, a.t + off, C, g, add, add);
    acc = group_reduce<L>(acc, smem);
    if (g.lane == 0) finish_prob_row(a, row, acc);
    if (a.dx == nullptr) return;
    grad = ProbGrad<T>::from_sums(a, row, acc);
  } else {
    grad = ProbGrad<T>::from_stats(a, row);
  }
  for (int64_t c = g.lane; c < C; c += g.size) grad.write(a, off + c, c, A(a.x[off + c]), A(a.t[off + c]));
}

template <typename T, bool kBackward>
__global__ void prob_thread_rows_kernel(ProbArgs<T> a) {
  using A = acc_t<T>;
  if (kBackward && a.skip()) return;
  const int64_t C = a.classes, inner = a.inner;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t off = thread_row_offset(row, C, inner);
    RowAcc<A> acc = RowAcc<A>::empty(false, true);
    if constexpr (!kBackward) {
      const ProbAddTo<T> add{acc, a};
      for (int64_t c = 0; c < C; ++c) add(c, a.x[off + c * inner], a.t[off + c * inner]);
      finish_prob_row(a, row, acc);
      if (a.dx == nullptr) continue;
    }
    const ProbGrad<T> grad = kBackward ? ProbGrad<T>::from_stats(a, row) : ProbGrad<T>::from_sums(a, row, acc);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = off + c * inner;
      grad.write(a, i, c, A(a.x[i]), A(a.t[i]));
    }
  }
}

template <typename T, bool kBackward>
void launch(const ProbArgs<T>& a) {
  launch_layout(a.rows, a.classes, a.inner, [&](auto layout, int64_t blocks, int threads) {
    auto stream = at::cuda::getCurrentCUDAStream();
    if constexpr (decltype(layout)::value == Layout::kThread) {
      prob_thread_rows_kernel<T, kBackward><<<blocks, threads, 0, stream>>>(a);
    } else {
      prob_rows_kernel<T, decltype(layout)::value, kBackward><<<blocks, threads, 0, stream>>>(a);
    }
  });
}

// 'mean' divides by the rows (0 / 0 for no elements: NaN, as torch); else 1.
double mean_denominator(Reduction red, const at::Tensor& input, const Geometry& g) {
  return red == Reduction::Mean ? (input.numel() == 0 ? 0.0 : double(g.rows())) : 1.0;
}

template <typename T>
ProbArgs<T> make_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& w, const Geometry& g,
                      double label_smoothing, Reduction red) {
  using A = acc_t<T>;
  ProbArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.t = t.data_ptr<T>();
  a.w = w.defined() ? w.data_ptr<A>() : nullptr;
  a.rows = g.rows(), a.classes = g.classes, a.inner = g.inner;
  const bool smooth = label_smoothing > 0.0;  // torch applies no smoothing for values <= 0
  a.ome = A(1) - (smooth ? A(label_smoothing) : A(0));
  a.eps_over_c = smooth ? A(label_smoothing / double(g.classes)) : A(0);
  a.denominator = mean_denominator(red, x, g);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    double label_smoothing, bool compute_grad) {
  check_input(input, c10::DeviceType::CUDA, "CUDA");
  check_smoothing(label_smoothing);
  check_prob_target(input, target);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous(), w = acc_weights(weight, input, g.classes);
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor stats = at::empty({3, g.rows()}, input.options().dtype(acc));
  at::Tensor rows = at::empty({g.rows()}, input.options().dtype(acc));
  const bool in_pass = compute_grad && red != Reduction::None;
  at::Tensor dx = in_pass ? at::empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  if (g.classes == 0) {  // torch: a loss of (-)0 per row; its mean over rows is 0 / rows
    rows.fill_(-0.0);
    stats.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_prob_forward", [&] {
      using A = acc_t<scalar_t>;
      ProbArgs<scalar_t> a = make_args<scalar_t>(x, t, w, g, label_smoothing, red);
      a.dx = in_pass ? dx.data_ptr<scalar_t>() : nullptr;
      a.loss_rows = rows.data_ptr<A>();
      a.row_stats = stats.data_ptr<A>();
      launch<scalar_t, false>(a);
    });
  }
  return {reduce_rows(rows, red, nullptr, mean_denominator(red, input, g), row_shape(input), input.scalar_type(),
                      false),
          stats, dx};
}

// The backward into dx and dt (each undefined when not asked for); into_buffer: dx is the
// forward's in-pass gradient, left as it is where the upstream gradient is exactly 1.
void backward_into(const at::Tensor& dx, const at::Tensor& dt, const at::Tensor& grad_loss, const at::Tensor& input,
                   const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                   int64_t reduction, double label_smoothing, bool into_buffer) {
  check_smoothing(label_smoothing);
  check_prob_target(input, target);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor st = check_stats(stats, "stats", 3, g, acc);
  check_same_device(st, input, "stats");
  check_same_device(grad_loss, input, "the upstream gradient");
  const at::Tensor x = input.contiguous(), t = target.contiguous(), w = acc_weights(weight, input, g.classes);
  const DeviceUpstream u = device_upstream(grad_loss, red, g.rows(), acc);
  if ((!dx.defined() && !dt.defined()) || input.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_prob_backward", [&] {
    using A = acc_t<scalar_t>;
    ProbArgs<scalar_t> a = make_args<scalar_t>(x, t, w, g, label_smoothing, red);
    a.dx = dx.defined() ? dx.data_ptr<scalar_t>() : nullptr;
    a.dt = dt.defined() ? dt.data_ptr<scalar_t>() : nullptr;
    a.row_stats = st.data_ptr<A>();
    a.grad_rows = u.rows.defined() ? u.rows.data_ptr<A>() : nullptr;
    a.grad_scalar = u.scalar.defined() ? u.scalar.data_ptr<double>() : nullptr;
    a.skip_if_one = into_buffer && red != Reduction::None;
    launch<scalar_t, true>(a);
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t reduction, double label_smoothing,
    bool input_grad, bool target_grad) {
  check_input(input, c10::DeviceType::CUDA, "CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor dx = input_grad ? at::empty(input.sizes(), input.options()) : at::Tensor();
  at::Tensor dt = target_grad ? at::empty(target.sizes(), target.options()) : at::Tensor();
  backward_into(dx, dt, grad_loss, input, target, weight, stats, reduction, label_smoothing, false);
  return {dx.defined() ? dx : at::empty({0}, input.options()), dt.defined() ? dt : at::empty({0}, target.options())};
}

void cross_entropy_prob_backward_into_cuda(at::Tensor& grad_input, const at::Tensor& grad_loss,
                                           const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                           int64_t reduction, double label_smoothing) {
  check_input(input, c10::DeviceType::CUDA, "CUDA");
  check_in_pass_buffer("cross_entropy", " backward_into", grad_input, grad_loss, input, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  backward_into(grad_input, at::Tensor(), grad_loss, input, target, weight, stats, reduction, label_smoothing, true);
}

}  // namespace
}  // namespace fused_loss::cuda::ce

TORCH_LIBRARY_IMPL(fused_loss, CUDA, m) {
  using namespace fused_loss::cuda::ce;
  m.impl("cross_entropy_prob_forward", &cross_entropy_prob_forward_cuda);
  m.impl("cross_entropy_prob_backward", &cross_entropy_prob_backward_cuda);
  m.impl("cross_entropy_prob_backward_into", &cross_entropy_prob_backward_into_cuda);
}
