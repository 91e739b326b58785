// What every CUDA kernel file of fused_loss shares: accumulation types, 16-byte vectors,
// deterministic reductions and launch helpers.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "fused_loss/row_split.h"  // Pack, kVec

namespace fused_loss::cuda {

using fused_loss::kVec;
using fused_loss::Pack;

// float for 16- and 32-bit inputs, double for double (as ATen's opmath type).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

constexpr int kWarp = 32;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Reductions in a fixed order (shuffle-down trees, then the warps' results in warp order), so
// that results are bitwise the same run to run. `S` is any value with members
// `merge(S)` and the free functions `S shfl(const S&, int lane)` and
// `S shfl_down(const S&, int delta)`; `identity` is the empty value.
template <typename S>
__device__ __forceinline__ S warp_reduce(S v) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) v.merge(shfl_down(v, d));
  return v;  // complete in lane 0
}

// Every lane of the warp gets the reduction of all lanes' values.
template <typename S>
__device__ __forceinline__ S warp_allreduce(S v) {
  return shfl(warp_reduce(v), 0);
}

// Every thread of the block gets the reduction of all threads' values. smem: blockDim.x / 32
// values of S (at most 32). Ends with a barrier, so smem may be reused at once.
template <typename S>
__device__ S block_reduce(S v, S* smem, const S& identity) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_reduce(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    S w = lane < warps ? smem[lane] : identity;
    w = warp_reduce(w);
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  const S r = smem[0];
  __syncthreads();
  return r;
}

// A sum as a reducible value.
template <typename A>
struct Sum {
  A v;
  __device__ __forceinline__ void merge(const Sum& o) { v += o.v; }
};
template <typename A>
__device__ __forceinline__ Sum<A> shfl(const Sum<A>& a, int lane) { return {__shfl_sync(0xffffffffu, a.v, lane)}; }
template <typename A>
__device__ __forceinline__ Sum<A> shfl_down(const Sum<A>& a, int d) { return {__shfl_down_sync(0xffffffffu, a.v, d)}; }

// Sum of one value per thread of the block, in a fixed order; every thread gets it. (-0 is the
// additive identity: a sum of -0 terms stays -0, as torch's.)
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ Sum<A> smem[32];
  return block_reduce(Sum<A>{v}, smem, Sum<A>{A(-0.0)}).v;
}

// Blocks of a grid-stride pass over n items, a function of n only (so the partial sums, and
// the result, do not depend on the device).
inline int grid_for(int64_t n, int threads, int max_blocks) {
  const int64_t per_block = int64_t(threads) * 4;
  return int(std::max<int64_t>(1, std::min<int64_t>(max_blocks, (n + per_block - 1) / per_block)));
}

}  // namespace fused_loss::cuda
