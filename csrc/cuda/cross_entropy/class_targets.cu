// Cross-entropy with class-index targets on CUDA: forward (with the gradient in the same pass),
// the in-place forward of linear cross-entropy's chunks, and backward; every option of the CPU
// operator (weights, ignore_index, label smoothing, softcap, temperature, z-loss, statistics).
//
// A call is three small steps around one pass over the logits:
//  1. the targets: each out of range fails a device assertion (as torch's CUDA nll_loss; no host
//     synchronisation) and is never used as an index; per-block sums of the counted targets'
//     weights; then one block makes the call's scalars: the 'mean' denominator, the sum of the
//     class weights (smoothing) and the upstream gradient of every row, all on the device;
//  2. the logits: a row's statistics in one read (RowAcc: max, sum of exponentials, and what the
//     options need), its loss and, with a gradient to write, the gradient in a second sweep over
//     the same row (the backward: that sweep alone, from the forward's max and log-sum);
//  3. the loss: reduce.cuh.
// Rows are spread by layout (row_math.cuh): a block per long row, a warp per row up to 2048
// classes, a thread per row for a few classes and for (N, C, d1..dk) input.
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

// The call's scalars, a double tensor on the device.
enum Scalar { kDenominator, kWSum, kUpstream, kScalars };

constexpr int kTargetThreads = 256;
constexpr int kTargetBlocks = 256;

template <typename A>
__global__ void class_targets_kernel(const int64_t* __restrict__ y, int64_t n, int64_t classes, int64_t ignore_index,
                                     const A* __restrict__ w, double* __restrict__ partials) {
  double v = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = y[i];
    if (t == ignore_index) continue;
    const bool ok = t >= 0 && t < classes;
    CUDA_KERNEL_ASSERT(ok && "fused_loss.cross_entropy: a target is out of bounds (not in [0, C), nor ignore_index)");
    if (ok) v += w != nullptr ? double(w[t]) : 1.0;
  }
  const double total = block_sum(v);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One block. upstream: the backward's scalar upstream gradient ('mean'/'sum'), or null (the
// forward's in-pass gradient is for an upstream gradient of 1).
template <typename A>
__global__ void class_scalars_kernel(const double* __restrict__ partials, int count, const A* __restrict__ w,
                                     int64_t classes, bool mean, const double* __restrict__ upstream,
                                     double* __restrict__ out) {
  double d = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) d += partials[i];
  d = block_sum(d);
  double ws = double(classes);
  if (w != nullptr) {
    double v = 0;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) v += double(w[c]);
    ws = block_sum(v);
  }
  if (threadIdx.x == 0) {
    // 'mean' divides by the summed weight of the counted targets; a zero total gives NaN, loss
    // and gradients, as torch's nll_loss (0 / 0).
    const double den = d == 0 ? std::numeric_limits<double>::quiet_NaN() : d;
    const double g = upstream != nullptr ? upstream[0] : 1.0;
    out[kDenominator] = mean ? den : 1.0;
    out[kWSum] = ws;
    out[kUpstream] = mean ? g / den : g;
  }
}

// What a class-target kernel reads and writes (passed by value).
template <typename T>
struct ClassArgs {
  using A = acc_t<T>;
  const T* x;
  T* dx;  // the gradient to write (null: the loss alone); may be x (in place)
  const int64_t* y;
  const A* w;  // class weights (acc type) or null
  int64_t ignore_index, rows, classes, inner;
  bool smooth;
  A eps, eps_over_c, z_loss;
  Shape<A> shape;
  bool stats;           // return_stats: the forward writes 5 parts, else 2
  A* loss_rows;         // forward: each row's loss
  A* row_stats;         // forward: written (parts x rows); backward: read (max, log_sum)
  const A* grad_rows;   // backward 'none': each row's upstream gradient (else scalars[kUpstream])
  const double* scalars;
  const double* grad_scalar;  // backward 'mean'/'sum': the upstream gradient, else null
  bool skip_if_one;     // backward into the forward's buffer: nothing to do for an upstream of exactly 1

  __device__ __forceinline__ bool skip() const { return skip_if_one && grad_scalar[0] == 1.0; }
  __device__ __forceinline__ CrossEntropyParams<A> params() const {
    return {smooth, eps, eps_over_c, A(scalars[kWSum]), z_loss};
  }
  __device__ __forceinline__ bool valid(int64_t t) const { return t >= 0 && t < classes; }
  __device__ __forceinline__ A weight(int64_t c) const { return w != nullptr ? w[c] : A(1); }
  // The target's class weight; NaN for an out-of-range target (reported by the targets' pass).
  __device__ __forceinline__ A target_weight(int64_t t) const {
    return valid(t) ? weight(t) : std::numeric_limits<A>::quiet_NaN();
  }
  __device__ __forceinline__ A upstream(int64_t row) const {
    return grad_rows != nullptr ? grad_rows[row] : A(scalars[kUpstream]);
  }
  __device__ __forceinline__ int parts() const { return stats ? 5 : 2; }

  // An ignored row's loss and statistics are 0 (its gradient too: zero_grad).
  __device__ __forceinline__ void ignored_row(int64_t row) const {
    loss_rows[row] = A(0);
    for (int k = 0; k < parts(); ++k) row_stats[k * rows + row] = A(0);
  }

  // A row's loss and statistics from its reduced sums (x_y: the target's raw logit, NaN for an
  // out-of-range target, which the targets' pass has reported).
  __device__ __forceinline__ void finish_row(int64_t row, const RowAcc<A>& acc, const RowLse<A>& l, A x_y,
                                             int64_t t) const {
    const CrossEntropyParams<A> p = params();
    const A w_y = target_weight(t);
    A loss = ce_class_row_loss(p, l, shape.z(x_y), w_y, shift_of(acc.m), acc.lin);
    A z_term = A(0);
    if (p.z_loss != A(0)) {
      z_term = ce_z_loss_row(p, l, w_y);
      loss += z_term;
    }
    loss_rows[row] = loss;
    row_stats[row] = l.max;
    row_stats[rows + row] = l.log_sum;
    if (stats) {
      row_stats[2 * rows + row] = acc.entropy(l);
      // The target's logit is the max, compared before shaping (a tie counts as correct).
      row_stats[3 * rows + row] = A(x_y == acc.raw);
      row_stats[4 * rows + row] = z_term;
    }
  }
};

// dx_c of a row: softmax(z)_c a - b w_c - [c == y] t_y, times dz/dx (cross_entropy_math.h).
template <typename T>
struct RowGrad {
  using A = acc_t<T>;
  A max, scale, b, t_y;
  int64_t target;
  bool smooth;
  const A* w;
  Shape<A> shape;

  __device__ __forceinline__ RowGrad(const ClassArgs<T>& a, const RowLse<A>& l, int64_t row, int64_t t) {
    const CrossEntropyParams<A> p = a.params();
    CrossEntropyClassGrad<A> cf = ce_class_grad_coefs(p, a.upstream(row), a.target_weight(t), l);
    if (isnan(l.log_sum)) cf.a = l.log_sum;  // a NaN row's gradient is NaN (see row_lse)
    // softmax(z)_c = exp(z_c - max) / sum: the division folded into the coefficient.
    max = l.max, scale = cf.a * acc_exp(-l.log_sum), b = cf.b, t_y = cf.t_y;
    target = t, smooth = p.smooth, w = a.w, shape = a.shape;
  }

  __device__ __forceinline__ A operator()(int64_t c, A x) const {
    A slope;
    const A z = shape.z(x, slope);
    A o = acc_exp(z - max) * scale;
    if (smooth) o -= b * (w != nullptr ? w[c] : A(1));
    if (c == target) o -= t_y;
    return shape.shaped ? o * slope : o;
  }
};

// The statistics of a row's share: f1 / fv of for_row.
template <typename T>
struct AddTo {
  using A = acc_t<T>;
  RowAcc<A>& acc;
  const ClassArgs<T>& a;
  template <int N>
  __device__ __forceinline__ void add(int64_t c0, const T* v) const {
    A z[N], raw[N], u[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      raw[k] = A(v[k]);
      z[k] = a.shape.z(raw[k]);
      u[k] = a.smooth ? a.weight(c0 + k) : A(0);
    }
    acc.add(z, raw, u);
  }
  __device__ __forceinline__ void operator()(int64_t c, T v) const { add<1>(c, &v); }
  __device__ __forceinline__ void operator()(int64_t c0, const Pack<T, kVec<T>>& p) const {
    add<kVec<T>>(c0, p.v);
  }
};

// Block and warp layouts: a group of threads per (N, C) row.
template <typename T, Layout L, bool kBackward>
__global__ void __launch_bounds__(max_threads(L)) class_rows_kernel(ClassArgs<T> a) {
  using A = acc_t<T>;
  __shared__ RowAcc<A> smem[32];
  if (kBackward && a.skip()) return;
  RowGroup g;
  int64_t row;
  if (!group_row<L>(a.rows, g, row)) return;
  const int64_t C = a.classes;
  const T* xr = a.x + row * C;
  T* dxr = a.dx != nullptr ? a.dx + row * C : nullptr;
  const int64_t t = a.y[row];
  if (t == a.ignore_index) {  // the same for the whole group
    if (!kBackward && g.lane == 0) a.ignored_row(row);
    if (dxr != nullptr) {
      for (int64_t c = g.lane; c < C; c += g.size) dxr[c] = static_cast<T>(0);
    }
    return;
  }
  RowLse<A> l;
  if constexpr (!kBackward) {
    // The target's logit before any gradient overwrites the row (in place).
    const A x_y = a.valid(t) ? A(xr[t]) : std::numeric_limits<A>::quiet_NaN();
    RowAcc<A> acc = RowAcc<A>::empty(a.stats, a.smooth);
    const AddTo<T> add{acc, a};
    for_row(xr, C, g, add, add);
    acc = group_reduce<L>(acc, smem);
    l = acc.lse();
    if (g.lane == 0) a.finish_row(row, acc, l, x_y, t);
    if (dxr == nullptr) return;
  } else {
    l = {a.row_stats[row], a.row_stats[a.rows + row]};
  }
  map_row(xr, dxr, C, g, RowGrad<T>(a, l, row, t));
}

// Thread layout: a thread per row; row (n, j) of (N, C, inner) has its classes inner apart.
template <typename T, bool kBackward>
__global__ void class_thread_rows_kernel(ClassArgs<T> a) {
  using A = acc_t<T>;
  if (kBackward && a.skip()) return;
  const int64_t C = a.classes, inner = a.inner;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t off = thread_row_offset(row, C, inner);
    const T* xr = a.x + off;
    T* dxr = a.dx != nullptr ? a.dx + off : nullptr;
    const int64_t t = a.y[row];
    if (t == a.ignore_index) {
      if (!kBackward) a.ignored_row(row);
      if (dxr != nullptr) {
        for (int64_t c = 0; c < C; ++c) dxr[c * inner] = static_cast<T>(0);
      }
      continue;
    }
    RowLse<A> l;
    if constexpr (!kBackward) {
      const A x_y = a.valid(t) ? A(xr[t * inner]) : std::numeric_limits<A>::quiet_NaN();
      RowAcc<A> acc = RowAcc<A>::empty(a.stats, a.smooth);
      const AddTo<T> add{acc, a};
      for (int64_t c = 0; c < C; ++c) add(c, xr[c * inner]);
      l = acc.lse();
      a.finish_row(row, acc, l, x_y, t);
      if (dxr == nullptr) continue;
    } else {
      l = {a.row_stats[row], a.row_stats[a.rows + row]};
    }
    const RowGrad<T> grad(a, l, row, t);
    for (int64_t c = 0; c < C; ++c) dxr[c * inner] = static_cast<T>(grad(c, A(xr[c * inner])));
  }
}

template <typename T, bool kBackward>
void launch(const ClassArgs<T>& a) {
  launch_layout(a.rows, a.classes, a.inner, [&](auto layout, int64_t blocks, int threads) {
    auto stream = at::cuda::getCurrentCUDAStream();
    if constexpr (decltype(layout)::value == Layout::kThread) {
      class_thread_rows_kernel<T, kBackward><<<blocks, threads, 0, stream>>>(a);
    } else {
      class_rows_kernel<T, decltype(layout)::value, kBackward><<<blocks, threads, 0, stream>>>(a);
    }
  });
}

// The inputs of a call, checked and on the device, and its scalars (step 1).
struct ClassCall {
  Geometry g;
  at::Tensor x, y, w, scalars;
};

// upstream: the backward's scalar upstream gradient as a double ('mean'/'sum'), or undefined.
ClassCall prepare(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                  Reduction red, int64_t ignore_index, const at::Tensor& upstream) {
  ClassCall c;
  c.g = geometry(input);
  check_class_target(target, input, c.g);
  const auto acc = at::toOpMathType(input.scalar_type());
  c.x = input.contiguous();
  c.y = target.to(at::kLong).contiguous();
  c.w = acc_weights(weight, input, c.g.classes);
  c.scalars = at::empty({kScalars}, input.options().dtype(at::kDouble));
  const int64_t rows = c.g.rows();
  const int blocks = grid_for(rows, kTargetThreads, kTargetBlocks);
  at::Tensor partials = at::empty({blocks}, c.scalars.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_loss_cross_entropy_targets", [&] {
    const scalar_t* wp = c.w.defined() ? c.w.data_ptr<scalar_t>() : nullptr;
    if (rows > 0) {
      class_targets_kernel<scalar_t><<<blocks, kTargetThreads, 0, stream>>>(
          c.y.data_ptr<int64_t>(), rows, c.g.classes, ignore_index, wp, partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      partials.zero_();
    }
    class_scalars_kernel<scalar_t><<<1, kTargetThreads, 0, stream>>>(
        partials.data_ptr<double>(), blocks, wp, c.g.classes, red == Reduction::Mean,
        upstream.defined() ? upstream.data_ptr<double>() : nullptr, c.scalars.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c;
}

template <typename T>
ClassArgs<T> make_args(const ClassCall& c, int64_t ignore_index, double label_smoothing, const RowOptions& opts) {
  using A = acc_t<T>;
  ClassArgs<T> a{};
  a.x = c.x.data_ptr<T>();
  a.y = c.y.data_ptr<int64_t>();
  a.w = c.w.defined() ? c.w.data_ptr<A>() : nullptr;
  a.ignore_index = ignore_index;
  a.rows = c.g.rows(), a.classes = c.g.classes, a.inner = c.g.inner;
  a.smooth = label_smoothing > 0.0;  // torch applies no smoothing for values <= 0
  a.eps = a.smooth ? A(label_smoothing) : A(0);
  a.eps_over_c = a.smooth ? A(label_smoothing / double(c.g.classes)) : A(0);
  a.z_loss = A(opts.z_loss);
  a.shape = Shape<A>::make(opts.softcap, opts.temperature);
  a.stats = opts.return_stats;
  a.scalars = c.scalars.data_ptr<double>();
  return a;
}

// The forward's work (see the CPU's forward_into): loss and stats, and the gradient for an
// upstream gradient of 1 into dx where defined (a new tensor, or the logits themselves).
std::tuple<at::Tensor, at::Tensor> forward_into(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, Reduction red,
                                                int64_t ignore_index, double label_smoothing, const RowOptions& opts,
                                                const at::Tensor& dx, bool acc_loss) {
  check_options_layout(opts, geometry(input));
  const ClassCall c = prepare(input, target, weight, red, ignore_index, at::Tensor());
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor stats = at::empty({opts.stats_parts(), c.g.rows()}, input.options().dtype(acc));
  at::Tensor rows = at::empty({c.g.rows()}, input.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_forward", [&] {
    using A = acc_t<scalar_t>;
    ClassArgs<scalar_t> a = make_args<scalar_t>(c, ignore_index, label_smoothing, opts);
    a.dx = dx.defined() ? dx.data_ptr<scalar_t>() : nullptr;
    a.loss_rows = rows.data_ptr<A>();
    a.row_stats = stats.data_ptr<A>();
    launch<scalar_t, false>(a);
  });
  // No classes: torch's smoothing term is (its sum) * (eps / 0), NaN in every row.
  const bool nan = c.g.classes == 0 && label_smoothing > 0.0;
  at::Tensor loss = reduce_rows(rows, red, c.scalars.data_ptr<double>() + kDenominator, 1.0, target.sizes(),
                                acc_loss ? acc : input.scalar_type(), nan);
  return {loss, stats};
}

void check_cuda_input(const at::Tensor& input) { check_input(input, c10::DeviceType::CUDA, "CUDA"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, bool compute_grad, std::optional<double> softcap, double temperature,
    double z_loss, bool return_stats, bool acc_loss) {
  check_cuda_input(input);
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, return_stats);
  const Reduction red = to_reduction(reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool in_pass = compute_grad && red != Reduction::None;
  at::Tensor dx = in_pass ? at::empty(input.sizes(), input.options()) : at::Tensor();
  auto [loss, stats] = forward_into(input, target, weight, red, ignore_index, label_smoothing, opts, dx, acc_loss);
  return {loss, stats, in_pass ? dx : at::empty({0}, input.options())};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_grad_in_place_cuda(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, std::optional<double> softcap, double temperature, double z_loss,
    bool return_stats) {
  check_cuda_input(input);
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, return_stats);
  const Reduction red = to_reduction(reduction);
  check_in_place(input, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  return forward_into(input, target, weight, red, ignore_index, label_smoothing, opts, input, true);
}

// The backward into dx: a new tensor, or (skip_if_one) the forward's in-pass gradient, left as it
// is where the upstream gradient is exactly 1.
void backward_into(const at::Tensor& dx, const at::Tensor& grad_loss, const at::Tensor& input,
                   const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                   int64_t reduction, int64_t ignore_index, double label_smoothing, std::optional<double> softcap,
                   double temperature, double z_loss, bool skip_if_one) {
  check_smoothing(label_smoothing);
  const RowOptions opts = row_options(softcap, temperature, z_loss, false);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  check_options_layout(opts, g);
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor st = check_stats(stats, "stats", 2, g, acc);
  check_same_device(st, input, "stats");
  check_same_device(grad_loss, input, "the upstream gradient");
  const DeviceUpstream u = device_upstream(grad_loss, red, g.rows(), acc);
  const ClassCall c = prepare(input, target, weight, red, ignore_index, u.scalar);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_backward", [&] {
    using A = acc_t<scalar_t>;
    ClassArgs<scalar_t> a = make_args<scalar_t>(c, ignore_index, label_smoothing, opts);
    a.dx = dx.data_ptr<scalar_t>();
    a.row_stats = st.data_ptr<A>();  // read only in the backward
    a.grad_rows = u.rows.defined() ? u.rows.data_ptr<A>() : nullptr;
    a.grad_scalar = u.scalar.defined() ? u.scalar.data_ptr<double>() : nullptr;
    a.skip_if_one = skip_if_one && red != Reduction::None;
    launch<scalar_t, true>(a);
  });
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                       int64_t reduction, int64_t ignore_index, double label_smoothing,
                                       std::optional<double> softcap, double temperature, double z_loss) {
  check_cuda_input(input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor dx = at::empty(input.sizes(), input.options());
  backward_into(dx, grad_loss, input, target, weight, stats, reduction, ignore_index, label_smoothing, softcap,
                temperature, z_loss, false);
  return dx;
}

void cross_entropy_backward_into_cuda(at::Tensor& grad_input, const at::Tensor& grad_loss, const at::Tensor& input,
                                      const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& stats, int64_t reduction, int64_t ignore_index,
                                      double label_smoothing, std::optional<double> softcap, double temperature,
                                      double z_loss) {
  check_cuda_input(input);
  check_in_pass_buffer("cross_entropy", " backward_into", grad_input, grad_loss, input, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  backward_into(grad_input, grad_loss, input, target, weight, stats, reduction, ignore_index, label_smoothing,
                softcap, temperature, z_loss, true);
}

}  // namespace
}  // namespace fused_loss::cuda::ce

TORCH_LIBRARY_IMPL(fused_loss, CUDA, m) {
  using namespace fused_loss::cuda::ce;
  m.impl("cross_entropy_forward", &cross_entropy_forward_cuda);
  m.impl("cross_entropy_forward_grad_in_place", &cross_entropy_forward_grad_in_place_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
  m.impl("cross_entropy_backward_into", &cross_entropy_backward_into_cuda);
}
