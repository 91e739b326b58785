"""Timing, peak memory and copy bandwidth, on the CPU and on CUDA."""
import ctypes
import statistics
import time
from typing import Callable, List

import numpy as np
import torch


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(setup: Callable, step: Callable, device: str, warmup: int = 2, min_reps: int = 5,
              max_reps: int = 100, budget_s: float = 3.0) -> List[float]:
    """Seconds of step(setup()) per repetition, warm-ups excluded; setup() is untimed. Stops
    after max_reps, or at min_reps once budget_s is spent. CUDA is timed with events."""
    for _ in range(warmup):
        step(setup())
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        state = setup()
        sync(device)
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(state)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(state)
            times.append(time.perf_counter() - t0)
    return times


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(setup: Callable, step: Callable, device: str) -> int:
    """Bytes the step adds at its peak. CUDA: max_memory_allocated above the start.
    CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the
    resident set at the start, with fused_loss's output cache emptied and glibc's free heap
    returned to the OS first (malloc_trim), so that every provider's buffers count as new
    memory. -1 where it cannot be measured."""
    state = setup()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(state)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    torch.ops.fused_loss.empty_cache()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
        step(state)
        return _status_bytes("VmHWM") - base
    except OSError:
        return -1


def _malloc_trim():
    """Return glibc's free heap pages to the OS, where glibc is the allocator."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def copy_bandwidth(device: str, nbytes: int = 256 << 20, reps: int = 7) -> float:
    """Bytes moved per second by copy_ between two resident buffers of nbytes, counting each
    copied byte twice (read and write): the yardstick of every memory floor. The fastest of
    `reps` copies: these machines are shared, and the floor is a best case."""
    n = max(nbytes, 64 << 20) // 4  # at least 64 MiB, so that caches do not flatter it
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_step(lambda: None, lambda _: dst.copy_(src), device, warmup=1, min_reps=reps, max_reps=reps,
                      budget_s=0)
    return 2 * n * 4 / min(times)
