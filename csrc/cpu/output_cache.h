// A small cache of large output buffers (the N x C gradients) for the CPU kernels.
//
// torch's CPU allocator returns big blocks to the OS on free, so every backward would
// write its gradient into fresh pages, and the kernel's page-fault zeroing then costs
// more than the kernel itself. Like torch's CUDA caching allocator, we keep a freed
// block and hand it to the next request of the same size. Blocks are 2 MiB aligned and
// advised to use transparent huge pages.
//
// While unused, the cache holds at most 2 blocks and at most 1 GiB (or an eighth of the
// machine's memory, if less); FUSED_LOSS_CPU_CACHE_BLOCKS and FUSED_LOSS_CPU_CACHE_BYTES set
// the limits at start-up (0 disables the cache), fused_loss.set_cpu_cache_limits() at run
// time; fused_loss.cpu_cache_info() tells what it holds and fused_loss.empty_cache()
// releases it. The tensors handed out have resizable storage, as torch's own.
#pragma once

#include <ATen/ATen.h>

namespace fused_loss::cpu {

// A contiguous tensor of `sizes` and `options` (CPU), from the cache when large.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Releases every unused cached block; returns the bytes released.
int64_t empty_cache();

}  // namespace fused_loss::cpu
