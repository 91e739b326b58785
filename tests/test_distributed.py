"""Vocab-parallel cross-entropy (fused_loss.distributed): over 2 gloo processes on the CPU, the
sharded results (plain and linear, even, uneven and empty slices, every option, a DTensor) equal
the unsharded ones in value and gradients; one all_gather per forward; and a group of one."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fused_loss
from fused_loss import reference

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def test_two_ranks_equal_the_unsharded_results(tmp_path):
    world = 2
    # The workers import this checkout's fused_loss (as this process does), not an installed one.
    root = os.path.dirname(os.path.dirname(fused_loss.__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, WORKER, str(rank), str(world), str(tmp_path / "store"),
                               str(tmp_path / f"rank{rank}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the 2-process gloo run did not finish in 240 s (a hang in a collective?)")
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out[-4000:]}"
    failures = []
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["cases"] >= 40
        failures += result["failures"]
    assert not failures, "\n".join(failures[:6])


def test_a_group_of_one_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (3, 5), generator=g)
    y[0, 0] = -100
    got = fused_loss.vocab_parallel_cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    want = reference.cross_entropy_with_options(x.reshape(15, 11), y.reshape(15), None, -100, "mean", 0.1, 5.0,
                                                1.0, 1e-3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    h = torch.randn(15, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got = fused_loss.vocab_parallel_linear_cross_entropy(h, w, y.reshape(15), reduction="sum")
    want = torch.nn.functional.cross_entropy(h @ w.T, y.reshape(15), reduction="sum")
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b)


def test_all_ignored_mean_is_nan_as_torch():
    x = torch.randn(4, 6, requires_grad=True)
    y = torch.full((4,), -100)
    got = fused_loss.vocab_parallel_cross_entropy(x, y)
    assert torch.isnan(got) and torch.isnan(torch.nn.functional.cross_entropy(x, y))


@pytest.mark.parametrize("call, error, match", [
    (lambda: fused_loss.vocab_parallel_cross_entropy(torch.randn(4, 6), torch.tensor([0, 1, 6, 2])), IndexError,
     "fused_loss.*out of bounds"),
    (lambda: fused_loss.vocab_parallel_cross_entropy(torch.randn(4, 6), torch.zeros(3, dtype=torch.int64)),
     ValueError, "fused_loss.*shape"),
    (lambda: fused_loss.vocab_parallel_cross_entropy(torch.randn(4, 6), torch.zeros(4, dtype=torch.int64),
                                                     class_start=2), ValueError, "both class_start and num_classes"),
    (lambda: fused_loss.vocab_parallel_cross_entropy(torch.randn(4, 6), torch.zeros(4, dtype=torch.int64),
                                                     class_start=2, num_classes=7), ValueError, "does not fit"),
    (lambda: fused_loss.vocab_parallel_cross_entropy(torch.randn(4, 6), torch.zeros(4, dtype=torch.int64),
                                                     weight=torch.ones(5)), ValueError, "class weight"),
    (lambda: fused_loss.vocab_parallel_cross_entropy(torch.randn(4, 6), torch.zeros(4, dtype=torch.int64),
                                                     reduction="avg"), ValueError, "reduction"),
    (lambda: fused_loss.vocab_parallel_linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 2),
                                                            torch.zeros(4, dtype=torch.int64)), ValueError,
     "fused_loss.*weight_shard"),
])
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_second_derivatives_are_refused():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    g, = torch.autograd.grad(fused_loss.vocab_parallel_cross_entropy(x, y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):  # never a silent wrong one
        g.sum().backward()
