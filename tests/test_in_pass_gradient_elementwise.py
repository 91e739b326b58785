"""The elementwise losses' gradient written during the forward (BCE-with-logits, smooth L1,
Huber, sigmoid focal; reductions mean and sum): torch's values, the bits of the backward op,
and torch's autograd semantics when a graph is used more than once or its gradient is kept."""
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fused_loss
from fused_loss import reference
from helpers import (assert_close_to_torch, check_kept_gradient_survives_the_next_step,
                     check_retained_graph_and_repeated_grad_calls)

ops = torch.ops.fused_loss


def _data(shape, dtype, seed=0, hard=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 2, shape, generator=g).double() if hard else torch.rand(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _rand(shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


# name -> (ours, torch's, options(shape, dtype) -> kwargs for both)
CASES = {
    "bce": (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, lambda s, d: {}),
    "bce_pos_weight": (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                       lambda s, d: {"pos_weight": _rand(s[-1:], d, 1, 3.0)}),
    "bce_weight_classes": (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                           lambda s, d: {"weight": _rand(s[-1:], d, 2)}),
    "bce_weight_rows_pos_weight": (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                                   lambda s, d: {"weight": _rand((*s[:-1], 1), d, 3),
                                                 "pos_weight": _rand(s[-1:], d, 4, 2.0, 0.5)}),
    "bce_weight_full": (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                        lambda s, d: {"weight": _rand(s, d, 5)}),
    "bce_scalar_weights": (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                           lambda s, d: {"weight": torch.tensor(0.7, dtype=d), "pos_weight": torch.tensor([2.0], dtype=d)}),
    "smooth_l1": (fused_loss.smooth_l1_loss, F.smooth_l1_loss, lambda s, d: {}),
    "smooth_l1_beta_0.3": (fused_loss.smooth_l1_loss, F.smooth_l1_loss, lambda s, d: {"beta": 0.3}),
    "l1": (fused_loss.smooth_l1_loss, F.smooth_l1_loss, lambda s, d: {"beta": 0.0}),
    "huber": (fused_loss.huber_loss, F.huber_loss, lambda s, d: {"delta": 0.5}),
    "huber_weight": (fused_loss.huber_loss, F.huber_loss, lambda s, d: {"delta": 1.5, "weight": _rand(s, d, 6)}),
    "focal": (fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss, lambda s, d: {}),
    "focal_no_alpha_gamma_1.5": (fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss,
                                 lambda s, d: {"alpha": -1.0, "gamma": 1.5}),
    "focal_gamma_0": (fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss,
                      lambda s, d: {"alpha": 0.4, "gamma": 0.0}),
}
# Odd sizes; rows of 1000 classes cut lines at a class weight's row ends; 70001 spans chunks.
SHAPES = [(64, 37), (3, 1000), (70001,), (2, 3, 1000), (1,)]


class OpLog(TorchDispatchMode):
    """Records the fused_loss operators called (with their arguments) while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_loss":
            self.calls.append((func._schema.name.split("::")[1], args))
        return func(*args, **(kwargs or {}))

    def names(self):
        return [name for name, _ in self.calls]


def _backward_of_one(fn, x, y, kw, reduction):
    """Loss and x.grad of loss.backward() (an upstream gradient of exactly 1)."""
    x = x.clone().requires_grad_()
    loss = fn(x, y, reduction=reduction, **kw)
    loss.backward()
    return loss.detach(), x.grad


def _check_against_torch(case, shape, dtype, reduction):
    ours_fn, torch_fn, options = CASES[case]
    x, y = _data(shape, dtype)
    kw = options(shape, dtype)
    with OpLog() as log:
        ours = _backward_of_one(ours_fn, x, y, kw, reduction)
    # the in-pass path was taken: the forward wrote the gradient, no backward op ran
    assert not any(name.endswith("_backward") for name in log.names()), log.names()
    theirs = _backward_of_one(torch_fn, x, y, kw, reduction)
    ref = _reference(torch_fn, x, y, kw, reduction)
    for i, what in enumerate(["value", "gradient"]):
        assert_close_to_torch(ours[i], theirs[i], lambda i=i: ref()[i], f"{case} {what}")


def _reference(torch_fn, x, y, kw, reduction):
    """The float64 loss and gradient of the same values (computed once, when first asked for)."""
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    return functools.cache(lambda: _backward_of_one(torch_fn, x.double(), y.double(), kw64, reduction))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_of_one_matches_torch_float32(case, shape, reduction):
    _check_against_torch(case, shape, torch.float32, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_of_one_matches_torch_in_other_dtypes(case, dtype, reduction):
    _check_against_torch(case, (40, 1000), dtype, reduction)


def test_broadcast_operands_and_inputs():
    """A weight broadcast over a middle dimension, and smooth L1's broadcast input and target
    (the in-pass gradient of the broadcast input is summed back by autograd)."""
    x, y = _data((3, 4, 5), torch.float32)
    kw = dict(weight=_rand((3, 1, 5), torch.float32, 7), pos_weight=_rand((4, 1), torch.float32, 8, 1.0, 0.5))
    for reduction in ("mean", "sum"):
        ours = _backward_of_one(fused_loss.binary_cross_entropy_with_logits, x, y, kw, reduction)
        theirs = _backward_of_one(F.binary_cross_entropy_with_logits, x, y, kw, reduction)
        ref = _reference(F.binary_cross_entropy_with_logits, x, y, kw, reduction)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close_to_torch(a, b, lambda i=i: ref()[i], "bce broadcast operands")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's broadcast warning
            ours = _backward_of_one(fused_loss.smooth_l1_loss, x[:, :1], y, {}, reduction)
            theirs = _backward_of_one(F.smooth_l1_loss, x[:, :1], y, {}, reduction)
            ref = _reference(F.smooth_l1_loss, x[:, :1], y, {}, reduction)
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_close_to_torch(a, b, lambda i=i: ref()[i], "smooth l1 broadcast input",
                                      terms=1 if i == 0 else y.shape[1])


def test_nan_and_inf_inputs():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 2.0, -3.0, 1e4, -1e4] * 3)
    y = torch.tensor([0.3, 1.0, 0.0, 0.2, 1.0, 0.0, 0.0, 1.0] * 3)
    pw = torch.tensor([3.0])
    for fn, tfn, kw in [(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, {}),
                        (fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                         {"pos_weight": pw}),
                        (fused_loss.smooth_l1_loss, F.smooth_l1_loss, {}),
                        (fused_loss.huber_loss, F.huber_loss, {}),
                        (fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss, {})]:
        for reduction in ("mean", "sum"):
            ours = _backward_of_one(fn, x, y, kw, reduction)
            theirs = _backward_of_one(tfn, x, y, kw, reduction)
            ref = _reference(tfn, x, y, kw, reduction)
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_close_to_torch(a, b, lambda i=i: ref()[i], f"{fn.__name__} {kw} {reduction}")


# --- the operators ---------------------------------------------------------------------------

def _op_args(name, x, y, reduction):
    """(forward args without compute_grad, backward args after the upstream gradient and
    before the input_grad/target_grad flags) of one operator on (x, y)."""
    c = x.shape[-1]
    return {
        "binary_cross_entropy_with_logits": (x, y, _rand((x.shape[0], 1), x.dtype, 9), _rand((c,), x.dtype, 10, 2.0),
                                             reduction),
        "smooth_l1_loss": (x, y, reduction, 0.5),
        "huber_loss": (x, y, _rand(x.shape, x.dtype, 11), reduction, 0.7),
        "sigmoid_focal_loss": (x, y, reduction, 0.25, 2.0),
    }[name]


OPS = ["binary_cross_entropy_with_logits", "smooth_l1_loss", "huber_loss", "sigmoid_focal_loss"]
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_in_pass_bits_equal_the_backward_recomputation(name, dtype, threads):
    """The forward's gradient has the bits of the backward op for an upstream gradient of 1,
    and computing it leaves the loss's bits unchanged; for 1 and 2 threads."""
    x, y = _data((37, 1000), dtype, seed=12)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, -1e4], dtype=dtype)
    fwd, bwd = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reduction in (1, 2):
            args = _op_args(name, x, y, reduction)
            loss, grad = fwd(*args, True)
            plain, none = fwd(*args, False)
            recomputed, _ = bwd(torch.ones((), dtype=dtype), *args, True, False)
            assert grad.shape == x.shape and none.numel() == 0
            assert _same_bits(loss, plain)
            assert _same_bits(grad, recomputed)
            assert grad.isfinite().logical_not().sum() > 0  # the NaN row went through
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("upstream", [1.0, 0.5])
@pytest.mark.parametrize("name", OPS)
def test_backward_into_keeps_the_buffer_only_for_an_upstream_of_one(name, upstream):
    """<loss>_backward_into (the CUDA backward's device-side "the upstream gradient is exactly 1";
    also registered on the CPU): the forward's buffer is kept for 1, else it gets the backward
    op's bits. Its errors name fused_loss."""
    x, y = _data((13, 100), torch.float32, seed=14)
    fwd, bwd, into = (getattr(ops, f"{name}_{kind}") for kind in ("forward", "backward", "backward_into"))
    args = _op_args(name, x, y, 1)
    _, buffer = fwd(*args, True)
    g = torch.tensor(upstream)
    want = bwd(g, *args, True, False)[0]
    assert _same_bits(buffer, want) == (upstream == 1.0)
    buffer.fill_(7.0)  # a sentinel: kept for an upstream of 1, overwritten otherwise
    into(buffer, g, *args)
    assert _same_bits(buffer, torch.full_like(buffer, 7.0) if upstream == 1.0 else want)
    with pytest.raises(RuntimeError, match=f"fused_loss.{name}_backward_into"):
        into(buffer[:, :5], g, *args)
    with pytest.raises(RuntimeError, match=f"fused_loss.{name}_backward_into"):
        into(buffer, torch.ones(2), *args)


def test_in_pass_bits_do_not_depend_on_the_thread_count():
    x, y = _data((300, 1000), torch.float32, seed=13)
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.binary_cross_entropy_with_logits_forward(x, y, None, _rand((1000,), x.dtype, 1), 1,
                                                                        True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_the_forward_writes_the_gradient_only_when_it_is_needed():
    x, y = _data((16, 50), torch.float32)
    assert ops.smooth_l1_loss_forward(x, y, 0, 1.0, True)[1].numel() == 0  # 'none': the backward computes it
    assert ops.smooth_l1_loss_forward(x, y, 1, 1.0, False)[1].numel() == 0

    def compute_grad_flags(fn, x, **kw):
        with OpLog() as log:
            fn(x, y, **kw)
        return [args[-1] for name, args in log.calls if name.endswith("_forward")]

    xg = x.clone().requires_grad_()
    for fn in (fused_loss.binary_cross_entropy_with_logits, fused_loss.smooth_l1_loss, fused_loss.huber_loss,
               fused_loss.sigmoid_focal_loss):
        assert compute_grad_flags(fn, x, reduction="mean") == [False]
        assert compute_grad_flags(fn, xg, reduction="mean") == [True]
        with torch.no_grad():
            assert compute_grad_flags(fn, xg, reduction="sum") == [False]
    # Huber's weight that needs a gradient takes every gradient from the composition
    w = torch.rand(16, 50, requires_grad=True)
    assert compute_grad_flags(fused_loss.huber_loss, xg, weight=w) == [False]


# --- autograd semantics (the forward's buffer is handed out at most once) ----------------------

SEMANTICS = {
    "bce": (lambda x, y, **kw: fused_loss.binary_cross_entropy_with_logits(x, y, pos_weight=PW, **kw),
            lambda x, y, **kw: F.binary_cross_entropy_with_logits(x, y, pos_weight=PW, **kw)),
    "smooth_l1": (fused_loss.smooth_l1_loss, F.smooth_l1_loss),
    "focal": (lambda x, y, **kw: fused_loss.sigmoid_focal_loss(x, y, **{"reduction": "mean", **kw}),
              lambda x, y, **kw: reference.sigmoid_focal_loss(x, y, **{"reduction": "mean", **kw})),
}
PW = torch.rand(500) + 0.5


def _xy():
    return _data((32, 500), torch.float32, seed=14)


@pytest.mark.parametrize("name", list(SEMANTICS))
def test_retained_graph_and_repeated_grad_calls(name):
    ours, theirs = SEMANTICS[name]
    x, y = _xy()
    expected = _backward_of_one(theirs, x, y, {}, "mean")[1]
    check_retained_graph_and_repeated_grad_calls(lambda xx: ours(xx, y, reduction="mean"), x, expected)


@pytest.mark.parametrize("name", list(SEMANTICS))
def test_two_losses_on_the_same_input_and_scaled_losses(name):
    ours, theirs = SEMANTICS[name]
    x, y = _xy()
    for combine in [lambda f, x: f(x, y, reduction="mean") + f(x, y, reduction="sum"),
                    lambda f, x: 0.5 * f(x, y, reduction="sum"),
                    lambda f, x: f(x, y, reduction="mean") * f(x.detach(), y, reduction="mean"),
                    lambda f, x: f(x, y, reduction="sum") + f(x, y, reduction="none").sum()]:
        grads = []
        for f in (ours, theirs):
            xx = x.clone().requires_grad_()
            combine(f, xx).backward()
            grads.append(xx.grad)
        torch.testing.assert_close(grads[0], grads[1])


def test_an_upstream_gradient_other_than_one_is_recomputed():
    x, y = _xy()
    xx = x.clone().requires_grad_()
    with OpLog() as log:
        (0.5 * fused_loss.smooth_l1_loss(xx, y)).backward()
    assert log.names().count("smooth_l1_loss_backward") == 1
    torch.testing.assert_close(xx.grad, 0.5 * _backward_of_one(F.smooth_l1_loss, x, y, {}, "mean")[1])


def test_gradient_accumulates_over_steps_and_a_kept_gradient_is_not_overwritten():
    x, y = _data((64, 40000), torch.float32, seed=15)  # 10 MB: the gradient comes from the buffer cache
    expected = _backward_of_one(F.smooth_l1_loss, x, y, {}, "mean")[1]
    xx = x.clone().requires_grad_()
    for _ in range(3):
        fused_loss.smooth_l1_loss(xx, y).backward()
    torch.testing.assert_close(xx.grad, 3 * expected)
    check_kept_gradient_survives_the_next_step(fused_loss.smooth_l1_loss, x, y)


@pytest.mark.parametrize("name", list(SEMANTICS))
def test_target_gradient_beside_the_in_pass_input_gradient(name):
    ours, theirs = SEMANTICS[name]
    x, y = _xy()
    grads = []
    for f in (ours, theirs):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        with OpLog() as log:
            f(xx, yy, reduction="sum").backward()
        if f is ours:  # the backward op ran for the target alone
            flags = [args[-2:] for n, args in log.calls if n.endswith("_backward")]
            assert flags == [(False, True)], flags
        grads.append((xx.grad, yy.grad))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", list(SEMANTICS))
def test_create_graph_gets_a_differentiable_gradient(name):
    ours, theirs = SEMANTICS[name]
    x, y = _data((8, 500), torch.float64, seed=16)
    results = []
    for f in (ours, theirs):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(xx, y.double(), reduction="mean"), xx, create_graph=True)
        (gg,) = torch.autograd.grad((g ** 2).sum(), xx)
        results.append((g.detach(), gg))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b)
    assert results[0][1].abs().sum() > 0


def test_huber_weight_that_needs_a_gradient():
    x, y = _xy()
    w = torch.rand(32, 500)
    grads = []
    for f in (fused_loss.huber_loss, F.huber_loss):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        f(xx, y, weight=ww).backward()
        grads.append((xx.grad, ww.grad))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)
