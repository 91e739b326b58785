"""The CPU output cache: large gradients (the N x C of cross-entropy) are written into
buffers kept from earlier steps, because fresh pages cost more to fault in than the
kernel takes (see csrc/cpu/output_cache.h). These functions inspect and bound it."""
from typing import NamedTuple, Optional

import torch


class CacheInfo(NamedTuple):
    blocks: int      # unused buffers held now
    bytes: int       # their size
    max_blocks: int  # limits: more than either is released, oldest first
    max_bytes: int


def cpu_cache_info() -> CacheInfo:
    """What the CPU output cache holds now, and its limits."""
    return CacheInfo(*torch.ops.fused_loss.cpu_cache_info())


def set_cpu_cache_limits(max_bytes: Optional[int] = None, max_blocks: Optional[int] = None) -> None:
    """Bounds the unused buffers the cache keeps (0 turns it off); None keeps a limit as is.
    Defaults: 2 blocks and 1 GiB (or an eighth of the machine's memory, if less), or the
    environment's FUSED_LOSS_CPU_CACHE_BLOCKS / FUSED_LOSS_CPU_CACHE_BYTES."""
    for name, value in (("max_bytes", max_bytes), ("max_blocks", max_blocks)):
        if value is not None and int(value) < 0:
            raise ValueError(f"fused_loss.set_cpu_cache_limits: {name} must be >= 0, got {value}")
    info = cpu_cache_info()
    torch.ops.fused_loss.set_cpu_cache_limits(info.max_bytes if max_bytes is None else int(max_bytes),
                                              info.max_blocks if max_blocks is None else int(max_blocks))


def empty_cache() -> int:
    """Releases every unused buffer of the CPU output cache; returns the bytes released."""
    return torch.ops.fused_loss.empty_cache()
