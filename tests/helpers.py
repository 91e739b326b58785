"""Comparison helpers for the loss tests."""
import os

import torch

# Where the comparisons run, fused_loss and torch alike: FUSED_LOSS_TEST_DEVICE=cuda runs every
# test built on them on the GPU (scripts/gpu_session.sh does); results come back to the CPU.
DEVICE = torch.device(os.environ.get("FUSED_LOSS_TEST_DEVICE", "cpu"))


def on_device(v):
    return v.to(DEVICE) if torch.is_tensor(v) else v

# Tolerances against torch's result in the same dtype (float32/float64). For the 16-bit
# types the rule is instead: error against a float64 reference no more than twice the
# error of torch's own result in that dtype (plus one rounding step).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
REDUCED = (torch.bfloat16, torch.float16)


def upstream(shape, dtype):
    """A fixed upstream gradient whose values (0.5 .. 1.25) are exact in every dtype."""
    gen = torch.Generator().manual_seed(123)
    return (torch.randint(2, 6, tuple(shape), generator=gen).double() / 4).to(dtype)


def run_with_grads(fn, tensors, **kwargs):
    """fn(*tensors, **kwargs) on fresh leaf copies; returns the output and the gradients of
    the floating-point tensors (None for the others) under `upstream`."""
    leaves = [on_device(t).detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves, **{k: on_device(v) for k, v in kwargs.items()})
    diff = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, diff, upstream(out.shape, out.dtype).to(out.device)))
    return out.detach().cpu(), [next(grads).detach().cpu() if t.requires_grad else None for t in leaves]


def assert_close_to_torch(ours, theirs, reference=None, what=""):
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    if ours.dtype in TOL:
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"{what}: {m}", **TOL[ours.dtype])
        return
    assert reference is not None, "16-bit results need a float64 reference"
    ref = reference.double()
    err_ours = (ours.double() - ref).abs()
    err_torch = (theirs.double() - ref).abs()
    slack = torch.finfo(ours.dtype).eps * (ref.abs() + 1e-3)
    bad = err_ours > 2 * err_torch + slack
    assert not bad.any(), (f"{what}: {int(bad.sum())} values with error above twice torch's: worst ours "
                           f"{err_ours.max().item():.3g}, torch {err_torch.max().item():.3g}")


def compare(fused_fn, torch_fn, tensors, **kwargs):
    """Value and gradients of fused_fn against torch_fn on the same inputs."""
    ours, g_ours = run_with_grads(fused_fn, tensors, **kwargs)
    theirs, g_theirs = run_with_grads(torch_fn, tensors, **kwargs)
    ref, g_ref = None, [None] * len(tensors)
    if ours.dtype in REDUCED:
        up = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
        ref, g_ref = run_with_grads(torch_fn, [t.double() if t.is_floating_point() else t for t in tensors], **up)
    assert_close_to_torch(ours, theirs, ref, "value")
    for i, (a, b, r) in enumerate(zip(g_ours, g_theirs, g_ref)):
        if a is not None or b is not None:
            assert a is not None and b is not None, f"grad {i}: one side has none"
            assert_close_to_torch(a, b, r, f"grad of argument {i}")
    return ours, g_ours


def check_kept_gradient_survives_the_next_step(loss_fn, x, target):
    """A gradient kept from one step (x.grad, then x.grad = None) is not overwritten by the next
    step's forward, whose gradient may come from fused_loss's buffer cache."""
    xx = x.clone().requires_grad_()
    loss_fn(xx, target).backward()
    kept = xx.grad
    before = kept.clone()
    xx.grad = None
    z = (x * 2).requires_grad_()
    loss_fn(z, target).backward()
    assert torch.equal(kept, before)
    assert kept.data_ptr() != z.grad.data_ptr()


def check_retained_graph_and_repeated_grad_calls(loss_fn, x, expected):
    """Every backward through a retained graph gives `expected` (d loss_fn(x) / dx), even after
    the user writes into an earlier result, and accumulates in x.grad."""
    xx = x.clone().requires_grad_()
    loss = loss_fn(xx)
    (g1,) = torch.autograd.grad(loss, xx, retain_graph=True)
    torch.testing.assert_close(g1, expected)
    g1.mul_(100)  # a user scribbling on the first result must not change the second
    (g2,) = torch.autograd.grad(loss, xx, retain_graph=True)
    torch.testing.assert_close(g2, expected)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(xx.grad, 2 * expected)
