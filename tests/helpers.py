"""Comparison helpers for the loss tests."""
import functools
import os

import torch

# Where the comparisons run, fused_loss and torch alike: FUSED_LOSS_TEST_DEVICE=cuda runs every
# test built on them on the GPU (scripts/gpu_session.sh does); results come back to the CPU.
DEVICE = torch.device(os.environ.get("FUSED_LOSS_TEST_DEVICE", "cpu"))


def on_device(v):
    return v.to(DEVICE) if torch.is_tensor(v) else v

# The rule of every comparison with torch (assert_close_to_torch):
# - float32: each value within torch's tolerance (TOL) of torch's float32 result, or, where a float64
#   reference is at hand, no farther from it than twice torch's own error plus one rounding step.
#   torch's float32 rounding depends on which of its CPU kernels runs (AVX2 or AVX-512), so a test
#   that trusts it alone is green on one machine and red on another.
# - bfloat16/float16: the float64 rule alone (torch's own error is the yardstick).
# - float64: torch's tolerance alone.
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


def _same(a, b):
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def _within_tolerance(o, t, tol):
    """Per element, torch.testing.assert_close's test (NaN equal to NaN, infinities exact)."""
    return _same(o, t) | ((o - t).abs() <= tol["atol"] + tol["rtol"] * t.abs())


def _float64_rule(o, t, r, precision, terms):
    """Per element: ours no farther from the float64 reference r than twice torch's error plus one
    rounding step of `precision`; non-finite only where torch or the reference is the same, finite
    where torch is not only if the reference is finite (torch overflowed). terms: how many rounded
    values autograd summed into each element (a broadcast argument's gradient); the slack grows with
    it, scaled by the tensor's magnitude (the terms may cancel)."""
    eps = torch.finfo(precision).eps
    mag = r.abs().nan_to_num(nan=0.0, posinf=0.0)
    slack = eps * (mag + 1e-3) if terms == 1 else eps * terms * (mag + (mag.max() if mag.numel() else 0.0) + 1e-3)
    fin = torch.isfinite(o) & torch.isfinite(t)
    ok = fin & ((o - r).abs() <= 2 * (t - r).abs() + slack)
    ok |= ~torch.isfinite(o) & (_same(o, t) | _same(o, r))
    ok |= torch.isfinite(o) & ~torch.isfinite(t) & torch.isfinite(r)
    return ok


def assert_close_to_torch(ours, theirs, reference=None, what="", precision=None, terms=1, tol=None):
    """The rule above. reference: the float64 result of the same computation, or a function that
    computes it (called only where torch's tolerance fails); precision: the dtype whose rule applies
    (default ours.dtype; the fuzzer passes the least precise dtype of the arguments); tol: a
    tolerance other than TOL[precision] (a computation with more roundings, as a matrix product)."""
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    precision = precision or ours.dtype
    tol = tol or TOL.get(precision)
    o, t = ours.double(), theirs.double()
    ok = _within_tolerance(o, t, tol) if tol is not None else torch.zeros_like(o, dtype=torch.bool)
    if bool(ok.all()):
        return
    if precision == torch.float64 or reference is None:
        assert precision not in REDUCED, f"{what}: 16-bit results need a float64 reference"
        worst = (o - t).abs().nan_to_num(nan=float("inf"))[~ok].max().item()
        raise AssertionError(f"{what}: {int((~ok).sum())} of {o.numel()} values beyond {precision}'s tolerance "
                             f"{tol} of torch's (greatest difference {worst:.3g}), and no float64 "
                             f"reference to judge them by")
    r = (reference() if callable(reference) else reference).double()
    bad = ~(ok | _float64_rule(o, t, r, precision, terms))
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        err_o, err_t = (o - r).abs()[bad], (t - r).abs()[bad]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {o.numel()} values farther from float64 than twice torch's {precision} "
            f"error: worst ours {err_o.max().item():.3g}, torch {err_t.max().item():.3g}; first at {list(i)}: ours "
            f"{o[i].item()!r}, torch {t[i].item()!r}, float64 {r[i].item()!r}")


def _as_float64(tensors, kwargs):
    double = lambda v: v.double() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return [double(t) for t in tensors], {k: double(v) for k, v in kwargs.items()}


def float64_reference(fn, *args, **kwargs):
    """A function returning fn(*args, **kwargs) on float64 copies of the floating-point tensors
    (detached), computed once when first called: the `reference` of assert_close_to_torch."""
    args64, kwargs64 = _as_float64([a.detach() if torch.is_tensor(a) else a for a in args],
                                   {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    return functools.cache(lambda: fn(*args64, **kwargs64))


def compare(fused_fn, torch_fn, tensors, **kwargs):
    """Value and gradients of fused_fn against torch_fn on the same inputs, by the rule above
    (torch_fn on float64 copies of the floating-point arguments gives the reference, computed only
    when needed)."""
    ours, g_ours = run_with_grads(fused_fn, tensors, **kwargs)
    theirs, g_theirs = run_with_grads(torch_fn, tensors, **kwargs)
    tensors64, kwargs64 = _as_float64(tensors, kwargs)
    reference = functools.cache(lambda: run_with_grads(torch_fn, tensors64, **kwargs64))
    assert_close_to_torch(ours, theirs, lambda: reference()[0], "value")
    for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
        if a is not None or b is not None:
            assert a is not None and b is not None, f"grad {i}: one side has none"
            assert_close_to_torch(a, b, lambda i=i: reference()[1][i], f"grad of argument {i}")
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
