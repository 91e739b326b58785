// CUDA kernels of the elementwise losses (BCE-with-logits, smooth L1, Huber, sigmoid focal
// loss): the per-element math of csrc/include/fused_loss/elementwise_math.h, as on the CPU.
//
// Forward: a grid-stride pass over the elements that reads x, y (16-byte vectors where aligned)
// and the broadcast operands, writes the per-element loss ('none') or, with compute_grad, the
// gradient for an upstream gradient of 1; each block sums its losses in a fixed order into one
// partial, and one block sums the partials in a fixed order: bitwise the same run to run (no
// atomics). The grid depends on the element count only.
// Backward: the upstream gradient is read on the device (a scalar's is never copied to the
// host): no host synchronisation anywhere, so forward and backward capture in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "fused_loss/broadcast.h"
#include "fused_loss/common.h"
#include "fused_loss/elementwise_math.h"

namespace fused_loss::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // partial sums per reduction; fixed per element count

// An operand broadcast over the input (BroadcastLayout): null data means 1.
template <typename T>
struct DeviceOperand {
  const T* data = nullptr;
  int64_t repeat = 1, period = 1;
  __device__ __forceinline__ acc_t<T> at(int64_t i) const {
    if (data == nullptr) return acc_t<T>(1);
    return static_cast<acc_t<T>>(data[(i / repeat) % period]);
  }
};

template <typename T>
DeviceOperand<T> device_operand(const std::optional<at::Tensor>& opt, const at::Tensor& input, at::Tensor& keep,
                                const char* name) {
  if (!opt.has_value() || !opt->defined()) return {};
  const at::Tensor& w = *opt;
  TORCH_CHECK(w.scalar_type() == input.scalar_type(), "fused_loss: ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(w.device() == input.device(), "fused_loss: ", name, " must be on the input's device ", input.device(),
              ", got ", w.device());
  const BroadcastLayout layout = broadcast_layout(w, input.sizes(), keep);
  return {keep.data_ptr<T>(), layout.repeat, layout.period};
}

// Applies f(i, args) to elements [i, i + count) of the thread's vector or single element.
template <typename T, typename F>
__device__ __forceinline__ void for_elements(const T* x, const T* y, const DeviceOperand<T>& w,
                                             const DeviceOperand<T>& pw, int64_t n, bool vectorized, F f) {
  using A = acc_t<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vectorized) {
    constexpr int V = kVec<T>;
    const int64_t vectors = n / V;
    for (int64_t v = tid; v < vectors; v += stride) {
      const Pack<T, V> xv = reinterpret_cast<const Pack<T, V>*>(x)[v];
      const Pack<T, V> yv = reinterpret_cast<const Pack<T, V>*>(y)[v];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t i = v * V + k;
        f(i, ElemArgs<A>{A(xv.v[k]), A(yv.v[k]), w.at(i), pw.at(i)});
      }
    }
    for (int64_t i = vectors * V + tid; i < n; i += stride) f(i, ElemArgs<A>{A(x[i]), A(y[i]), w.at(i), pw.at(i)});
    return;
  }
  for (int64_t i = tid; i < n; i += stride) f(i, ElemArgs<A>{A(x[i]), A(y[i]), w.at(i), pw.at(i)});
}

template <typename T, typename Op>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ y, DeviceOperand<T> w,
                               DeviceOperand<T> pw, int64_t n, bool vectorized, Op op, T* __restrict__ loss_out,
                               T* __restrict__ dx, acc_t<T> grad_scale, acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  A sum = A(0);
  for_elements<T>(x, y, w, pw, n, vectorized, [&](int64_t i, const ElemArgs<A>& a) {
    if (loss_out != nullptr) {  // 'none'
      loss_out[i] = static_cast<T>(op.loss(a));
    } else if (dx != nullptr) {
      const ElemLossGrad<A> r = op.loss_and_grad(a);
      sum += r.loss;
      dx[i] = static_cast<T>(r.dx * grad_scale);
    } else {
      sum += op.loss(a);
    }
  });
  if (partials != nullptr) {
    const A total = block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

// One block: the partials in a fixed order, in double, then the mean's division.
template <typename T, typename A>
__global__ void finish_kernel(const A* __restrict__ partials, int count, double divisor, T* __restrict__ out) {
  double v = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) v += double(partials[i]);
  const double total = block_sum(v);
  if (threadIdx.x == 0) out[0] = static_cast<T>(total / divisor);  // 0 / 0 is NaN, as in torch
}

template <typename T, typename Op>
__global__ void backward_kernel(const T* __restrict__ x, const T* __restrict__ y, DeviceOperand<T> w,
                                DeviceOperand<T> pw, int64_t n, bool vectorized, Op op,
                                const T* __restrict__ grad_elems, const double* __restrict__ grad_scalar,
                                double grad_scalar_divisor, T* __restrict__ dx, T* __restrict__ dy,
                                bool skip_if_one) {
  using A = acc_t<T>;
  // Into the forward's in-pass gradient (backward_into): it is already right for an upstream of 1.
  // The upstream scalar is read as a double and divided in double, as the CPU does (item<double>()):
  // rounded to a 16-bit input's dtype first, 1.001 would pass for 1 and 0.1 scale by bf16(0.1).
  if (skip_if_one && grad_scalar[0] == 1.0) return;
  const A g_all = grad_scalar != nullptr ? A(grad_scalar[0] / grad_scalar_divisor) : A(0);
  for_elements<T>(x, y, w, pw, n, vectorized, [&](int64_t i, const ElemArgs<A>& a) {
    const A g = grad_elems != nullptr ? A(grad_elems[i]) : g_all;
    if (dx != nullptr) dx[i] = static_cast<T>(op.grad_input(a) * g);
    if (dy != nullptr) dy[i] = static_cast<T>(op.grad_target(a) * g);
  });
}

// A call's contiguous input and target and its broadcast operands (kept alive here).
template <typename T>
struct Inputs {
  at::Tensor x, y, keep_w, keep_pw;
  DeviceOperand<T> w, pw;

  Inputs(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& pos_weight)
      : x(input.contiguous()), y(target.contiguous()) {
    w = device_operand<T>(weight, x, keep_w, "weight");
    pw = device_operand<T>(pos_weight, x, keep_pw, "pos_weight");
  }
  bool vectorized() const { return aligned16(x.data_ptr()) && aligned16(y.data_ptr()); }
};

int blocks_for(int64_t n) { return grid_for(n, kThreads, kMaxBlocks); }

void check_pair(const at::Tensor& input, const at::Tensor& target, const char* name) {
  TORCH_CHECK(input.is_cuda(), "fused_loss.", name, " (CUDA kernel): input must be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fused_loss.", name, ": expected a floating point input, got ",
              input.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "Target size (", target.sizes(), ") must be the same as input size (",
                    input.sizes(), ")");
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), "fused_loss.", name, ": target must have the input's dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
  TORCH_CHECK(target.device() == input.device(), "fused_loss.", name, ": target must be on the input's device ",
              input.device(), ", got ", target.device());
}

template <typename T, typename Op>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                bool compute_grad, const Op& op) {
  using A = acc_t<T>;
  const Reduction red = to_reduction(reduction);
  const Inputs<T> in(input, target, weight, pos_weight);
  const at::Tensor &x = in.x, &y = in.y;
  const DeviceOperand<T> &w = in.w, &pw = in.pw;
  const int64_t n = x.numel();
  const int blocks = blocks_for(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor empty = at::empty({0}, x.options());
  if (red == Reduction::None) {
    at::Tensor out = at::empty_like(x);
    const bool vec = in.vectorized();
    if (n > 0) {
      forward_kernel<T, Op><<<blocks, kThreads, 0, stream>>>(x.data_ptr<T>(), y.data_ptr<T>(), w, pw, n, vec, op,
                                                             out.data_ptr<T>(), nullptr, A(0), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {out, empty};
  }
  at::Tensor dx = compute_grad ? at::empty_like(x) : empty;
  const bool vec = in.vectorized();
  at::Tensor partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
  at::Tensor loss = at::empty({}, x.options());
  const A scale = A(red == Reduction::Mean ? 1.0 / double(n) : 1.0);  // the backward's for an upstream 1
  if (n > 0) {
    forward_kernel<T, Op><<<blocks, kThreads, 0, stream>>>(x.data_ptr<T>(), y.data_ptr<T>(), w, pw, n, vec, op,
                                                           nullptr, compute_grad ? dx.data_ptr<T>() : nullptr, scale,
                                                           partials.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    partials.zero_();
  }
  finish_kernel<T, A><<<1, kThreads, 0, stream>>>(partials.data_ptr<A>(), blocks,
                                                  red == Reduction::Mean ? double(n) : 1.0, loss.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, dx};
}

// into: the forward's in-pass gradient to overwrite unless the upstream gradient is exactly 1
// (backward_into), or null for a new tensor.
template <typename T, typename Op>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                 bool input_grad, bool target_grad, const Op& op,
                                                 const at::Tensor* into = nullptr) {
  const Reduction red = to_reduction(reduction);
  const Inputs<T> in(input, target, weight, pos_weight);
  const at::Tensor &x = in.x, &y = in.y;
  const DeviceOperand<T> &w = in.w, &pw = in.pw;
  const int64_t n = x.numel();
  at::Tensor dx = into != nullptr ? *into : input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dy = target_grad ? at::empty_like(y) : at::empty({0}, y.options());
  if ((!input_grad && !target_grad) || n == 0) return {dx, dy};
  TORCH_CHECK(grad.device() == x.device(), "fused_loss: expected the gradient on ", x.device(), ", got ",
              grad.device());
  at::Tensor g;
  if (red == Reduction::None) {
    TORCH_CHECK(grad.sizes() == x.sizes(), "fused_loss: expected a gradient of shape ", x.sizes(), ", got ",
                grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "fused_loss: expected a scalar gradient, got shape ", grad.sizes());
  }
  g = grad.to(red == Reduction::None ? x.scalar_type() : at::kDouble).contiguous();
  const bool vec = in.vectorized();
  const bool per_element = red == Reduction::None;
  auto stream = at::cuda::getCurrentCUDAStream();
  backward_kernel<T, Op><<<blocks_for(n), kThreads, 0, stream>>>(
      x.data_ptr<T>(), y.data_ptr<T>(), w, pw, n, vec, op, per_element ? g.data_ptr<T>() : nullptr,
      per_element ? nullptr : g.data_ptr<double>(), red == Reduction::Mean ? double(n) : 1.0,
      input_grad ? dx.data_ptr<T>() : nullptr, target_grad ? dy.data_ptr<T>() : nullptr,
      into != nullptr && !per_element);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dy};
}

template <typename Op>
std::tuple<at::Tensor, at::Tensor> forward_entry(const char* name, const Op& op, const at::Tensor& input,
                                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                 bool compute_grad) {
  check_pair(input, target, name);
  const c10::cuda::CUDAGuard guard(input.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_elementwise", [&] {
    return forward_impl<scalar_t>(input, target, weight, pos_weight, reduction, compute_grad, op);
  });
}

template <typename Op>
std::tuple<at::Tensor, at::Tensor> backward_entry(const char* name, const Op& op, const at::Tensor& grad,
                                                  const at::Tensor& input, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& weight,
                                                  const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                  bool input_grad, bool target_grad) {
  check_pair(input, target, name);
  const c10::cuda::CUDAGuard guard(input.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_elementwise", [&] {
    return backward_impl<scalar_t>(grad, input, target, weight, pos_weight, reduction, input_grad, target_grad, op);
  });
}

template <typename Op>
void backward_into_entry(const char* name, const Op& op, at::Tensor& buffer, const at::Tensor& grad,
                         const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_pair(input, target, name);
  const c10::cuda::CUDAGuard guard(input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_elementwise", [&] {
    backward_impl<scalar_t>(grad, input, target, weight, pos_weight, reduction, true, false, op, &buffer);
  });
}

#include "fused_loss/elementwise_entries.h"  // the ops' entry points, over forward_entry/backward_entry

}  // namespace
}  // namespace fused_loss::cuda

TORCH_LIBRARY_IMPL(fused_loss, CUDA, m) {
  using namespace fused_loss::cuda;
  FUSED_LOSS_REGISTER_ELEMENTWISE(m);
}
