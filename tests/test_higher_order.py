"""Higher-order autodiff: double (and triple) backward, gradgradcheck, the torch.func
transforms and forward-mode AD give torch's answers, never a silent zero."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fused_loss
from fused_loss import reference

GEN = torch.Generator().manual_seed(3)
X = torch.randn(4, 5, dtype=torch.float64, generator=GEN)
Y = torch.rand(4, 5, dtype=torch.float64, generator=GEN)
T = torch.randint(0, 5, (4,), generator=GEN)
W = torch.rand(5, dtype=torch.float64, generator=GEN) + 0.5
T3 = torch.randint(0, 5, (2, 2), generator=GEN)


def _losses(lib, focal):
    """name -> (loss of x, loss of (x, y)); y is the target where it has a gradient."""
    return {
        "ce": lambda x: lib.cross_entropy(x, T, label_smoothing=0.1, weight=W),
        "ce_kdim": lambda x: lib.cross_entropy(x.reshape(2, 5, 2), T3, reduction="sum"),
        "ce_prob": lambda x, y: lib.cross_entropy(x, torch.softmax(y, 1), label_smoothing=0.2, reduction="sum"),
        "bce": lambda x, y: lib.binary_cross_entropy_with_logits(x, y, weight=W, pos_weight=W.flip(0)),
        "smooth_l1": lambda x, y: lib.smooth_l1_loss(x, y, beta=0.5, reduction="sum"),
        "huber": lambda x, y: lib.huber_loss(x, y, delta=0.5),
        "focal": lambda x, y: focal(x, y, alpha=0.25, gamma=1.5, reduction="mean"),
    }


OURS = _losses(fused_loss, fused_loss.sigmoid_focal_loss)
TORCH = _losses(F, reference.sigmoid_focal_loss)
NAMES = list(OURS)


def _args(name):
    return (X.clone(),) if OURS[name].__code__.co_argcount == 1 else (X.clone(), Y.clone())


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_matches_torch(name):
    def second(fn):
        args = [a.requires_grad_() for a in _args(name)]
        grads = torch.autograd.grad(fn(*args), args, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)  # a gradient penalty
        return torch.autograd.grad(penalty, args)

    for a, b in zip(second(OURS[name]), second(TORCH[name])):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck(name):
    args = [a.requires_grad_() for a in _args(name)]
    assert torch.autograd.gradgradcheck(OURS[name], args)


def test_third_derivative():
    def third(fn):
        x = X.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, T), x, create_graph=True)
        (gg,) = torch.autograd.grad((g**3).sum(), x, create_graph=True)
        return torch.autograd.grad((gg**2).sum(), x)[0]

    torch.testing.assert_close(third(fused_loss.cross_entropy), third(F.cross_entropy))


def test_grad_of_the_upstream_gradient():
    """d(grad_input)/d(grad_output), as torch.autograd.functional.vjp(create_graph) uses."""
    for lib in (fused_loss, F):
        x, g = X.clone().requires_grad_(), torch.rand(4, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(lib.cross_entropy(x, T, reduction="none"), x, g, create_graph=True)
        (gg,) = torch.autograd.grad(gx.sum(), g)
        if lib is fused_loss:
            ours = gg
    torch.testing.assert_close(ours, gg)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian", "vmap_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_func_transforms(name, transform):
    args = _args(name)

    def run(fn):
        if transform == "vmap_grad":
            batch = [torch.stack([a, a * 0.5 + 0.1]) for a in args]
            return torch.func.vmap(torch.func.grad(fn))(*batch)
        return getattr(torch.func, transform)(fn)(*args)

    ours, theirs = run(OURS[name]), run(TORCH[name])
    torch.testing.assert_close(ours, theirs)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_ad(name):
    args = _args(name)
    tangent = torch.rand_like(args[0])

    def jvp(fn):
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(args[0], tangent), *args[1:])
            return fwAD.unpack_dual(out)

    ours, theirs = jvp(OURS[name]), jvp(TORCH[name])
    assert ours.tangent is not None
    torch.testing.assert_close(ours.primal, theirs.primal)
    torch.testing.assert_close(ours.tangent, theirs.tangent)


def test_first_order_stays_fused():
    """Plain backward goes through the fused backward op (not the composite)."""
    x = X.clone().requires_grad_()
    loss = fused_loss.cross_entropy(x, T)
    assert "fused_loss" in type(loss.grad_fn).__name__


@pytest.mark.parametrize("name", [n for n in NAMES if OURS[n].__code__.co_argcount == 2])
def test_second_derivative_with_respect_to_the_target_alone(name):
    """Only the target requires grad: its first derivative's own derivative (a bug once paired
    the target's derivative with the input's missing cotangent and dropped it)."""
    def second(fn):
        y = Y.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(X, y), y, create_graph=True)
        if not g.requires_grad:  # linear in y (BCE): no second derivative, on both sides
            return torch.zeros_like(y)
        (gg,) = torch.autograd.grad((g**2).sum(), y, allow_unused=True)
        return torch.zeros_like(y) if gg is None else gg

    torch.testing.assert_close(second(OURS[name]), second(TORCH[name]))
    y = Y.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda y: OURS[name](X, y), (y,))
    if name != "bce":
        assert second(OURS[name]).abs().sum() > 0


def test_torch_func_and_forward_ad_under_torch_compile():
    x, y = X.clone(), torch.softmax(Y, 1)
    ours = torch.compile(torch.func.grad(lambda x: fused_loss.cross_entropy(x, y)))(x)
    torch.testing.assert_close(ours, torch.func.grad(lambda x: F.cross_entropy(x, y))(x))

    def tangent(fn):
        with fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, torch.ones_like(x)), y)).tangent

    torch.testing.assert_close(torch.compile(lambda: tangent(fused_loss.cross_entropy))(),
                               tangent(F.cross_entropy))
