// A small cache of large output buffers (the N x C gradients) for the CPU kernels.
//
// torch's CPU allocator returns big blocks to the OS on free, so every backward would
// write its gradient into fresh pages, and the kernel's page-fault zeroing then costs
// more than the kernel itself. Like torch's CUDA caching allocator, we keep a freed
// block and hand it to the next request of the same size. Blocks are 2 MiB aligned and
// advised to use transparent huge pages.
//
// At most kMaxFreeBlocks blocks are held while unused (default 2; FUSED_LOSS_CPU_CACHE_BLOCKS
// sets it, 0 disables the cache); torch.ops.fused_loss.empty_cache() releases them.
#pragma once

#include <ATen/ATen.h>

namespace fused_loss::cpu {

// A contiguous tensor of `sizes` and `options` (CPU), from the cache when large.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Releases every unused cached block; returns the bytes released.
int64_t empty_cache();

}  // namespace fused_loss::cpu
