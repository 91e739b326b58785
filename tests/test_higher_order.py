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


# --- the second derivative of every optional argument -----------------------------------------
# Every second derivative runs the composite formulas (fused_loss/composite.py), not the kernels:
# each optional argument of each loss is held to torch's second derivative here (a mistake there,
# such as Huber's weight dropped, changes no first derivative and no value).
W_FULL = torch.rand(4, 5, dtype=torch.float64, generator=GEN) + 0.5
T_IGNORED = torch.tensor([1, -100, 4, 0])
T_KDIM = torch.tensor([[0, 3], [-100, 1]])


def _ce_formula(x, t, **kw):
    from test_cross_entropy_options import torch_formula  # the options written in torch ops
    return torch_formula(x, t, **kw)


# name -> (fused_loss's loss, torch's): functions of x, or of (x, y) where y has a gradient.
OPTION_CASES = {
    "ce weight": (lambda x: fused_loss.cross_entropy(x, T, weight=W), lambda x: F.cross_entropy(x, T, weight=W)),
    "ce label_smoothing": (lambda x: fused_loss.cross_entropy(x, T, label_smoothing=0.3),
                           lambda x: F.cross_entropy(x, T, label_smoothing=0.3)),
    "ce ignore_index, weight, smoothing, sum": (
        lambda x: fused_loss.cross_entropy(x, T_IGNORED, weight=W, label_smoothing=0.2, reduction="sum"),
        lambda x: F.cross_entropy(x, T_IGNORED, weight=W, label_smoothing=0.2, reduction="sum")),
    "ce ignore_index=1, none": (lambda x: fused_loss.cross_entropy(x, T, ignore_index=1, reduction="none"),
                                lambda x: F.cross_entropy(x, T, ignore_index=1, reduction="none")),
    "ce kdim weight, smoothing": (
        lambda x: fused_loss.cross_entropy(x.reshape(2, 5, 2), T_KDIM, weight=W, label_smoothing=0.1),
        lambda x: F.cross_entropy(x.reshape(2, 5, 2), T_KDIM, weight=W, label_smoothing=0.1)),
    "ce softcap": (lambda x: fused_loss.cross_entropy(x, T, softcap=1.5), lambda x: _ce_formula(x, T, softcap=1.5)),
    "ce temperature": (lambda x: fused_loss.cross_entropy(x, T, temperature=0.6),
                       lambda x: _ce_formula(x, T, temperature=0.6)),
    "ce z_loss": (lambda x: fused_loss.cross_entropy(x, T_IGNORED, weight=W, z_loss=0.1),
                  lambda x: _ce_formula(x, T_IGNORED, weight=W, z_loss=0.1)),
    "ce every option": (
        lambda x: fused_loss.cross_entropy(x, T_IGNORED, weight=W, label_smoothing=0.1, softcap=2.0,
                                           temperature=1.3, z_loss=0.05, reduction="sum"),
        lambda x: _ce_formula(x, T_IGNORED, weight=W, label_smoothing=0.1, softcap=2.0, temperature=1.3,
                              z_loss=0.05, reduction="sum")),
    "ce probabilities weight, smoothing": (
        lambda x, y: fused_loss.cross_entropy(x, torch.softmax(y, 1), weight=W, label_smoothing=0.2),
        lambda x, y: F.cross_entropy(x, torch.softmax(y, 1), weight=W, label_smoothing=0.2)),
    "ce probabilities z_loss": (
        lambda x, y: fused_loss.cross_entropy(x, torch.softmax(y, 1), z_loss=0.1, temperature=0.8),
        lambda x, y: _ce_formula(x, torch.softmax(y, 1), z_loss=0.1, temperature=0.8)),
    "bce weight": (lambda x, y: fused_loss.binary_cross_entropy_with_logits(x, y, weight=W_FULL),
                   lambda x, y: F.binary_cross_entropy_with_logits(x, y, weight=W_FULL)),
    "bce pos_weight": (lambda x, y: fused_loss.binary_cross_entropy_with_logits(x, y, pos_weight=W, reduction="sum"),
                       lambda x, y: F.binary_cross_entropy_with_logits(x, y, pos_weight=W, reduction="sum")),
    "bce weight, pos_weight, none": (
        lambda x, y: fused_loss.binary_cross_entropy_with_logits(x, y, W[:1], reduction="none", pos_weight=W),
        lambda x, y: F.binary_cross_entropy_with_logits(x, y, W[:1], reduction="none", pos_weight=W)),
    "smooth_l1 beta": (lambda x, y: fused_loss.smooth_l1_loss(x, y, beta=2.0),
                       lambda x, y: F.smooth_l1_loss(x, y, beta=2.0)),
    "smooth_l1 beta, none": (lambda x, y: fused_loss.smooth_l1_loss(x, y, beta=0.3, reduction="none"),
                             lambda x, y: F.smooth_l1_loss(x, y, beta=0.3, reduction="none")),
    "huber delta": (lambda x, y: fused_loss.huber_loss(x, y, delta=2.0, reduction="sum"),
                    lambda x, y: F.huber_loss(x, y, delta=2.0, reduction="sum")),
    "huber weight": (lambda x, y: fused_loss.huber_loss(x, y, delta=0.4, weight=W_FULL),
                     lambda x, y: F.huber_loss(x, y, delta=0.4, weight=W_FULL)),
    "huber weight, none": (lambda x, y: fused_loss.huber_loss(x, y, weight=W_FULL.flip(0), reduction="none"),
                           lambda x, y: F.huber_loss(x, y, weight=W_FULL.flip(0), reduction="none")),
    "focal alpha, gamma": (lambda x, y: fused_loss.sigmoid_focal_loss(x, y, alpha=0.7, gamma=3.0, reduction="sum"),
                           lambda x, y: reference.sigmoid_focal_loss(x, y, alpha=0.7, gamma=3.0, reduction="sum")),
    "focal no alpha": (lambda x, y: fused_loss.sigmoid_focal_loss(x, y, alpha=-1.0, gamma=1.0, reduction="mean"),
                       lambda x, y: reference.sigmoid_focal_loss(x, y, alpha=-1.0, gamma=1.0, reduction="mean")),
    "focal none": (lambda x, y: fused_loss.sigmoid_focal_loss(x, y, alpha=0.1, gamma=2.5),
                   lambda x, y: reference.sigmoid_focal_loss(x, y, alpha=0.1, gamma=2.5)),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_second_derivative_of_every_option_matches_torch(name):
    """A Hessian-vector product (the gradient of a gradient penalty, with an upstream gradient
    that is not all ones for 'none') with respect to the input and the target where it has one."""
    ours_fn, torch_fn = OPTION_CASES[name]

    def second(fn):
        args = [a.requires_grad_() for a in ((X.clone(),) if fn.__code__.co_argcount == 1 else (X.clone(), Y.clone()))]
        loss = fn(*args)
        up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        grads = torch.autograd.grad(loss, args, up, create_graph=True)
        penalty = sum((g * g.detach().sign() * torch.arange(1, g.numel() + 1, dtype=g.dtype).reshape(g.shape)).sum()
                      + (g ** 2).sum() for g in grads if g.requires_grad)
        return [torch.zeros_like(a) if h is None else h
                for a, h in zip(args, torch.autograd.grad(penalty, args, allow_unused=True))]

    ours, theirs = second(ours_fn), second(torch_fn)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ours[0].abs().sum() > 0
