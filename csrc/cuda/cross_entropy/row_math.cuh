// Cross-entropy on CUDA: how a row is spread over threads and read (device code, shared by the
// class-index and probability-target kernels). Which elements of a row a thread reads:
// fused_loss/row_split.h; its sums over them, and their merge: fused_loss/row_sums.h; the row's
// formulas: fused_loss/cross_entropy_math.h, as on the CPU.
#pragma once

#include "../cuda_common.cuh"
#include "fused_loss/row_split.h"
#include "fused_loss/row_sums.h"

namespace fused_loss {

// Moving a row's sums between the lanes of a warp (warp_reduce; beside RowAcc, for lookup):
// each sum moved by `move`.
template <typename A, typename Move>
__device__ __forceinline__ RowAcc<A> moved(const RowAcc<A>& a, Move move) {
  return {move(a.m), move(a.s), move(a.h), move(a.lin), move(a.wsum), move(a.raw), a.stats, a.linear};
}
template <typename A>
__device__ __forceinline__ RowAcc<A> shfl_down(const RowAcc<A>& a, int d) {
  return moved(a, [d](A v) { return __shfl_down_sync(0xffffffffu, v, d); });
}
template <typename A>
__device__ __forceinline__ RowAcc<A> shfl(const RowAcc<A>& a, int lane) {
  return moved(a, [lane](A v) { return __shfl_sync(0xffffffffu, v, lane); });
}

}  // namespace fused_loss

namespace fused_loss::cuda::ce {

// The logits a kernel sees: z = softcap * tanh(x / softcap) / temperature (either part
// optional), or x itself; mapped as they are loaded, never stored.
template <typename A>
struct Shape {
  bool shaped = false;  // any of the two
  bool capped = false;
  A inv_cap = 0;     // 1 / softcap
  A z_per_tanh = 0;  // softcap / temperature
  A inv_t = 1;       // 1 / temperature

  static Shape make(std::optional<double> softcap, double temperature) {
    Shape s;
    s.capped = softcap.has_value();
    s.shaped = s.capped || temperature != 1.0;
    s.inv_cap = s.capped ? A(1.0 / *softcap) : A(0);
    s.z_per_tanh = s.capped ? A(*softcap / temperature) : A(0);
    s.inv_t = A(1.0 / temperature);
    return s;
  }
  __device__ __forceinline__ A z(A x) const {
    if (!shaped) return x;
    return capped ? acc_tanh(x * inv_cap) * z_per_tanh : x * inv_t;
  }
  // z and dz/dx = (1 - tanh^2) / temperature.
  __device__ __forceinline__ A z(A x, A& slope) const {
    if (!shaped) {
      slope = A(1);
      return x;
    }
    if (!capped) {
      slope = inv_t;
      return x * inv_t;
    }
    const A th = acc_tanh(x * inv_cap);
    slope = (A(1) - th * th) * inv_t;
    return th * z_per_tanh;
  }
};

// How a row is spread over threads: a whole block per row (long rows), a warp per row, or a
// thread per row (rows of a few classes, and the K-dimensional layout, whose classes are
// `inner` apart and whose neighbouring rows are neighbouring in memory).
enum class Layout { kBlock, kWarp, kThread };

constexpr int kWarpRowMaxClasses = 2048;  // up to here a warp per row, above a block
constexpr int kThreadRowMaxClasses = 16;  // (N, C) rows this short get a thread each
constexpr int kRowsThreads = 256;         // block size of the warp and thread layouts

// The most threads a block of the layout has (the kernels' __launch_bounds__: without it a
// float64 row kernel takes more registers than 1024 threads can have on sm_90).
constexpr int max_threads(Layout l) { return l == Layout::kBlock ? 1024 : kRowsThreads; }

inline Layout layout_for(int64_t classes, int64_t inner) {
  if (inner > 1 || classes <= kThreadRowMaxClasses) return Layout::kThread;
  return classes <= kWarpRowMaxClasses ? Layout::kWarp : Layout::kBlock;
}

// Block size of the block layout: about 64 classes a thread, 128 to 1024 threads.
inline int block_threads_for(int64_t classes) {
  int t = 128;
  while (t < 1024 && int64_t(t) * 64 < classes) t *= 2;
  return t;
}

template <Layout L>
using LayoutTag = std::integral_constant<Layout, L>;

// Launches the kernel of the shape's layout: launch(LayoutTag<L>{}, blocks, threads). The block
// and warp layouts' kernels take their row with group_row; the thread layout's stride over rows.
template <typename F>
void launch_layout(int64_t rows, int64_t classes, int64_t inner, F launch) {
  if (rows == 0) return;
  switch (layout_for(classes, inner)) {
    case Layout::kThread:
      launch(LayoutTag<Layout::kThread>{}, std::min<int64_t>((rows + kRowsThreads - 1) / kRowsThreads, 65536),
             kRowsThreads);
      break;
    case Layout::kWarp: {
      const int64_t per_block = kRowsThreads / kWarp;
      const int64_t blocks = (rows + per_block - 1) / per_block;
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fused_loss.cross_entropy: too many rows (", rows,
                  ") for the CUDA kernel");
      launch(LayoutTag<Layout::kWarp>{}, blocks, kRowsThreads);
      break;
    }
    case Layout::kBlock:
      TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "fused_loss.cross_entropy: too many rows (", rows,
                  ") for the CUDA kernel");
      launch(LayoutTag<Layout::kBlock>{}, rows, block_threads_for(classes));
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The row of this thread's group and its place in it (block and warp layouts); false past the
// last row (a whole warp: the warp layout has no block barrier).
template <Layout L>
__device__ __forceinline__ bool group_row(int64_t rows, RowGroup& g, int64_t& row) {
  if constexpr (L == Layout::kWarp) {
    g = {int(threadIdx.x % kWarp), kWarp};
    row = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  } else {
    g = {int(threadIdx.x), int(blockDim.x)};
    row = blockIdx.x;
  }
  return row < rows;
}

// A group's reduction of its threads' sums; every thread gets it. Afterwards every thread of the
// group has read its share of the row, so the row may be overwritten (in place).
template <Layout L, typename A>
__device__ __forceinline__ RowAcc<A> group_reduce(RowAcc<A> acc, RowAcc<A>* smem) {
  if constexpr (L == Layout::kWarp) {
    acc = warp_allreduce(acc);
    __syncwarp();
    return acc;
  } else {
    return block_reduce(acc, smem, RowAcc<A>::empty(acc.stats, acc.linear));
  }
}

// The thread layout's rows: row (n, j) of (N, C, inner) starts at n * C * inner + j.
__device__ __forceinline__ int64_t thread_row_offset(int64_t row, int64_t classes, int64_t inner) {
  const int64_t n = row / inner;
  return n * classes * inner + (row - n * inner);
}

}  // namespace fused_loss::cuda::ce
