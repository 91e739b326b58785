// Cross-entropy on CUDA: the loss from per-row losses, for every kernel file. 'none' keeps the
// rows; 'mean' and 'sum' sum them in double in a fixed order (per-block partials, then one
// block), divide on the device ('mean') and round once to the output's dtype: no host
// synchronisation, the same bits run to run.
#pragma once

#include <ATen/Dispatch.h>

#include "../cuda_common.cuh"
#include "fused_loss/common.h"
#include "fused_loss/cross_entropy_args.h"

namespace fused_loss::cuda::ce {

constexpr int kReduceThreads = 256;
constexpr int kReduceBlocks = 1024;

template <typename A>
__global__ void sum_rows_kernel(const A* __restrict__ rows, int64_t n, double* __restrict__ partials) {
  double v = -0.0;  // the additive identity: a sum of -0 terms stays -0, as torch's
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    v += double(rows[i]);
  }
  const double total = block_sum(v);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One block. denominator: on the device (read there), or null for host_denominator. nan: the
// loss is NaN whatever the rows (torch's smoothing over no classes).
template <typename Out>
__global__ void finish_loss_kernel(const double* __restrict__ partials, int count,
                                   const double* __restrict__ denominator, double host_denominator, bool nan,
                                   Out* __restrict__ out) {
  double v = -0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) v += partials[i];
  const double total = block_sum(v);
  if (threadIdx.x == 0) {
    const double d = denominator != nullptr ? *denominator : host_denominator;
    out[0] = static_cast<Out>(nan ? std::numeric_limits<double>::quiet_NaN() : total / d);  // 0 / 0: NaN, as torch
  }
}

// The loss of a call: rows (acc type, contiguous) reduced as asked, in dtype `out`.
// 'mean' divides by *denominator (a double on the device) or, when it is null, host_denominator.
inline at::Tensor reduce_rows(const at::Tensor& rows, Reduction red, const double* denominator,
                              double host_denominator, at::IntArrayRef shape, at::ScalarType out, bool nan) {
  if (red == Reduction::None) {
    at::Tensor r = rows.view(shape).to(out);
    if (nan) r.fill_(std::numeric_limits<double>::quiet_NaN());
    return r;
  }
  const int64_t n = rows.numel();
  const int blocks = grid_for(n, kReduceThreads, kReduceBlocks);
  at::Tensor partials = at::empty({blocks}, rows.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fused_loss_sum_rows", [&] {
      sum_rows_kernel<scalar_t><<<blocks, kReduceThreads, 0, stream>>>(rows.data_ptr<scalar_t>(), n,
                                                                       partials.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    partials.fill_(-0.0);
  }
  at::Tensor loss = at::empty({}, rows.options().dtype(out));
  const double* den = red == Reduction::Mean ? denominator : nullptr;
  const double host_den = red == Reduction::Mean ? host_denominator : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out, "fused_loss_finish_loss", [&] {
    finish_loss_kernel<scalar_t><<<1, kReduceThreads, 0, stream>>>(partials.data_ptr<double>(), blocks, den,
                                                                   host_den, nan, loss.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

// A backward's upstream gradient, checked and on the device: one per row ('none', in the acc
// type) or one for all rows (a double, as the CPU reads it with item<double>(); never copied to the
// host).
struct DeviceUpstream {
  at::Tensor rows, scalar;  // one of them defined
};

inline DeviceUpstream device_upstream(const at::Tensor& grad_loss, Reduction red, int64_t rows,
                                      at::ScalarType acc) {
  DeviceUpstream u;
  ce_args::check_upstream(grad_loss, red, rows);
  if (red == Reduction::None) {
    u.rows = grad_loss.reshape(-1).to(acc).contiguous();
  } else {
    u.scalar = grad_loss.reshape({1}).to(at::kDouble).contiguous();
  }
  return u;
}

}  // namespace fused_loss::cuda::ce
