"""The CPU output cache behaves like torch's memory: resizable gradient storage, bounded
by bytes and blocks, inspectable, releasable."""
import os
import subprocess
import sys

import pytest
import torch

import fused_loss

MiB = 1 << 20


@pytest.fixture
def cache():
    before = fused_loss.cpu_cache_info()
    fused_loss.empty_cache()
    fused_loss.set_cpu_cache_limits(max_bytes=1 << 30, max_blocks=2)  # whatever the environment set
    yield
    fused_loss.set_cpu_cache_limits(before.max_bytes, before.max_blocks)
    fused_loss.empty_cache()


def _backward(rows, classes=8192):
    x = torch.randn(rows, classes, requires_grad=True)
    fused_loss.cross_entropy(x, torch.randint(0, classes, (rows,))).backward()
    return x


def test_gradient_storage_resizes_like_torchs(cache):
    x = _backward(1024)  # a 32 MiB gradient: from the cache
    storage = x.grad.untyped_storage()
    assert storage.resizable()
    storage.resize_(0)  # what sharded training does to free a gradient
    assert storage.nbytes() == 0
    assert fused_loss.cpu_cache_info().blocks == 1  # the block went back to the cache
    y = _backward(1024)
    assert fused_loss.cpu_cache_info().blocks == 0  # and was reused
    y.grad.untyped_storage().resize_(64)
    y.grad.untyped_storage().resize_(32 * MiB)


def test_byte_and_block_limits(cache):
    fused_loss.set_cpu_cache_limits(max_bytes=40 * MiB, max_blocks=2)
    assert fused_loss.cpu_cache_info()[2:] == (2, 40 * MiB)
    for rows in (1024, 640):  # 32 MiB, then 20 MiB: together over the byte cap
        x = _backward(rows)
        del x
    info = fused_loss.cpu_cache_info()
    assert info.bytes <= 40 * MiB and info.blocks == 1 and info.bytes == 20 * MiB, info
    fused_loss.set_cpu_cache_limits(max_blocks=0)  # None keeps the byte cap
    assert fused_loss.cpu_cache_info() == (0, 0, 0, 40 * MiB)
    del _backward(1024).grad
    assert fused_loss.cpu_cache_info().blocks == 0


def test_empty_cache_reports_what_it_released(cache):
    fused_loss.set_cpu_cache_limits(max_bytes=1 << 30, max_blocks=2)
    _backward(1024)
    assert fused_loss.cpu_cache_info().bytes == 32 * MiB
    assert fused_loss.empty_cache() == 32 * MiB
    assert fused_loss.cpu_cache_info().bytes == 0


def test_limits_from_the_environment():
    code = "import fused_loss; print(tuple(fused_loss.cpu_cache_info()))"
    env = dict(os.environ, FUSED_LOSS_CPU_CACHE_BYTES=str(5 * MiB), FUSED_LOSS_CPU_CACHE_BLOCKS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str((0, 0, 3, 5 * MiB))


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        fused_loss.set_cpu_cache_limits(max_bytes=-1)
    code = "import fused_loss; print(fused_loss.cpu_cache_info().max_blocks)"
    env = dict(os.environ, FUSED_LOSS_CPU_CACHE_BLOCKS="1e9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2" and "not a non-negative integer" in out.stderr
