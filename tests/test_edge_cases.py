"""torch's semantics at the edges: empty class dimensions, huge class counts, non-finite
rows, NaN options and differences, tiny beta, mixed dtypes, odd but legal shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

import fused_loss
from helpers import assert_close_to_torch, compare, float64_reference


def _same(ours, theirs, reference=None):
    """Same dtype, shape, values (NaN where torch has NaN; with a float64 reference, by tests/helpers.py's
    rule) and signs of zeros."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (ours, theirs)
    assert_close_to_torch(ours, theirs, reference, "loss", tol=dict(atol=1e-6, rtol=1e-6))
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs)) or ours.isnan().any(), (ours, theirs)


# --- empty class dimension ------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(3, 0), (0,), (3, 0, 4), (0, 0)], ids=str)
def test_probability_targets_without_classes(shape, reduction):
    x, t = torch.empty(shape, requires_grad=True), torch.empty(shape)
    ours = fused_loss.cross_entropy(x, t, reduction=reduction)
    _same(ours, F.cross_entropy(x, t, reduction=reduction))
    (grad,) = torch.autograd.grad(ours.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_class_targets_without_classes_all_ignored(reduction):
    # (torch's K-dim path fails on (N, 0, d) input with a size mismatch; (N, 0) is the comparable case.)
    x, t = torch.empty(3, 0, requires_grad=True), torch.full((3,), -100)
    _same(fused_loss.cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction))
    with pytest.raises(IndexError):
        fused_loss.cross_entropy(x, torch.zeros(3, dtype=torch.long))


# --- class indices past 2^24 (not representable one by one in float32) --------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kdim_targets_above_2_pow_24_hit_exactly_their_class(dtype):
    classes = 2**24 + 3
    x = torch.zeros(1, classes, 2, dtype=dtype, requires_grad=True)  # uniform softmax: p = 1/C everywhere
    t = torch.tensor([[classes - 2, classes - 3]])
    (grad,) = torch.autograd.grad(fused_loss.cross_entropy(x, t, reduction="sum"), x)
    grad = grad.float()[0]
    hits = (grad < -0.5).nonzero().tolist()  # p - 1 at the target, p elsewhere
    assert hits == [[classes - 3, 1], [classes - 2, 0]], hits
    assert grad.max().item() < 1e-6


# --- non-finite rows and options -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("path", ["row", "kdim", "prob", "smooth"])
def test_rows_of_minus_infinity_give_nan_like_torch(path, dtype):
    x = torch.randn(3, 6, 2, dtype=dtype) if path == "kdim" else torch.randn(3, 6, dtype=dtype)
    x[1] = float("-inf")
    t = torch.randint(0, 6, (3, 2) if path == "kdim" else (3,))
    kw = dict(label_smoothing=0.1) if path == "smooth" else {}
    if path == "prob":
        t = torch.softmax(torch.randn(3, 6), 1).to(dtype)
    for reduction in ["none", "sum"]:
        compare(fused_loss.cross_entropy, F.cross_entropy, [x, t], reduction=reduction, **kw)
    xx = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fused_loss.cross_entropy(xx, t, reduction="sum", **kw), xx)
    assert grad[1].isnan().all() and not grad[0].isnan().any()


@pytest.mark.parametrize("smoothing", [float("nan"), -0.5])
def test_label_smoothing_nan_or_negative_is_no_smoothing(smoothing):
    x, t = torch.randn(5, 7), torch.randint(0, 7, (5,))
    compare(fused_loss.cross_entropy, F.cross_entropy, [x, t], label_smoothing=smoothing)
    compare(fused_loss.cross_entropy, F.cross_entropy, [x, torch.softmax(x, 1)], label_smoothing=smoothing)


def test_unbatched_input_with_a_target_of_shape_one():
    x, t = torch.randn(5), torch.tensor([2])
    for reduction in ["none", "mean", "sum"]:
        _same(fused_loss.cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction),
              float64_reference(F.cross_entropy, x, t, reduction=reduction))
        # torch's backward fails here ("size mismatch"); ours is that of the scalar target.
        compare(lambda x, t, **kw: fused_loss.cross_entropy(x, t.view(1), **kw), F.cross_entropy,
                [x, t.view(())], reduction=reduction)
    with pytest.raises(RuntimeError, match="1D target must have size 1"):
        fused_loss.cross_entropy(x, torch.tensor([2, 1]))


def test_probability_target_weight_gradient():
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in ["none", "mean", "sum"]:
        for smoothing in [0.0, 0.2]:
            compare(fused_loss.cross_entropy, F.cross_entropy, [x, t, w], reduction=reduction,
                    label_smoothing=smoothing)


def test_class_target_weight_gradient_is_refused_as_in_torch():
    x, t, w = torch.randn(4, 5, requires_grad=True), torch.randint(0, 5, (4,)), torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.cross_entropy(x, t, w)
    with pytest.raises(RuntimeError, match="fused_loss.cross_entropy.*not differentiable with respect to .*weight"):
        fused_loss.cross_entropy(x, t, w)
    with torch.no_grad():  # as torch: fine when no gradient is recorded
        fused_loss.cross_entropy(x, t, w)


# --- smooth L1 / Huber --------------------------------------------------------------------------

NAN_DIFFS = torch.tensor([float("nan"), 1.0, 0.2, -3.0, 0.0, float("inf")], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("loss,kw", [("smooth_l1_loss", dict(beta=1.0)), ("smooth_l1_loss", dict(beta=0.5)),
                                     ("smooth_l1_loss", dict(beta=0.0)), ("huber_loss", dict(delta=1.0)),
                                     ("huber_loss", dict(delta=2.5))])
def test_nan_differences_give_torch_gradients(loss, kw, dtype):
    x, y = NAN_DIFFS.to(dtype), torch.zeros(6, dtype=dtype)
    for args in ([x, y], [y, x]):
        compare(getattr(fused_loss, loss), getattr(F, loss), args, reduction="none", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("beta", [2.0**-140, 2.0**-130, 2.0**-100, 1e-30, 2.0**100])
def test_smooth_l1_tiny_and_huge_beta(beta, dtype):
    x = torch.tensor([0.0, 1.0, -2.0, 3e-39, 1e-30], dtype=torch.float64).to(dtype)
    compare(fused_loss.smooth_l1_loss, F.smooth_l1_loss, [x, torch.zeros_like(x)], reduction="none", beta=beta)


def test_huber_computes_in_the_promoted_dtype_and_returns_the_inputs():
    x, y = torch.tensor([1000.0], dtype=torch.float16), torch.tensor([1000.3])
    ours, theirs = fused_loss.huber_loss(x, y, reduction="none"), F.huber_loss(x, y, reduction="none")
    assert ours.dtype == theirs.dtype == torch.float16
    assert ours.item() == theirs.item()  # 0.0450, not the 0.125 of a target rounded to half
    # torch's own backward fails for this mix ("Found dtype Float but expected Half"); ours gives
    # each argument its gradient in its dtype.
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    gx, gy = torch.autograd.grad(fused_loss.huber_loss(xx, yy), (xx, yy))
    assert gx.dtype == torch.float16 and gy.dtype == torch.float32
    assert math.isclose(gy.item(), 0.3, rel_tol=1e-3) and math.isclose(gx.item(), -0.3, rel_tol=1e-2)


@pytest.mark.parametrize("xd,yd", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                   (torch.float32, torch.float64), (torch.float64, torch.float32),
                                   (torch.bfloat16, torch.float32)])
def test_bce_returns_the_targets_dtype(xd, yd):
    x, y = torch.randn(4, 3).to(xd), torch.rand(4, 3).to(yd)
    for kw in [{}, dict(weight=torch.rand(3, dtype=torch.float64)), dict(pos_weight=torch.rand(3) + 0.5)]:
        ours = fused_loss.binary_cross_entropy_with_logits(x, y, **kw)
        theirs = F.binary_cross_entropy_with_logits(x, y, **kw)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.double(), theirs.double(), atol=2e-2, rtol=2e-2)


def test_smooth_l1_of_an_integer_input_and_a_float_target():
    x, y = torch.tensor([1, 2, 3]), torch.tensor([1.5, 2.0, 3.25])
    for reduction in ["none", "mean"]:
        _same(fused_loss.smooth_l1_loss(x, y, reduction=reduction), F.smooth_l1_loss(x, y, reduction=reduction))
        _same(fused_loss.smooth_l1_loss(y, x, reduction=reduction), F.smooth_l1_loss(y, x, reduction=reduction))
    with pytest.raises(NotImplementedError):
        fused_loss.smooth_l1_loss(x, x)
    with pytest.raises(RuntimeError, match="can't be cast"):
        fused_loss.huber_loss(x, y)


# --- found by the fuzzer (tests/test_fuzz.py) ------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 0)], ids=str)
def test_smoothing_without_classes_is_nan_as_in_torch(shape, reduction):
    x, t = torch.empty(shape), torch.zeros(shape[0], dtype=torch.long)
    kw = dict(ignore_index=0, label_smoothing=0.5, reduction=reduction)
    _same(fused_loss.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw))


def test_kdim_class_targets_without_classes_all_ignored_are_zero():
    # torch fails here with a size mismatch (see README); ours is what torch gives for (N, 0).
    out = fused_loss.cross_entropy(torch.empty(2, 0, 3), torch.full((2, 3), -100), reduction="none")
    assert torch.equal(out, torch.zeros(2, 3))


@pytest.mark.parametrize("case", ["kdim", "smooth_weight_mean", "smooth_weight_sum", "plain", "unbatched"])
def test_uint8_targets_where_torch_takes_them(case):
    x, t, kw = torch.randn(4, 3), torch.tensor([0, 2, 1, 2], dtype=torch.uint8), {}
    if case == "kdim":
        x, t = torch.randn(4, 3, 2), t[:, None].expand(4, 2).contiguous()
    elif case.startswith("smooth_weight"):
        kw = dict(weight=torch.rand(3), label_smoothing=0.1, reduction=case.split("_")[-1])
    elif case == "unbatched":
        x, t = x[0], t[0]
    try:
        expected = F.cross_entropy(x, t, **kw)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="fused_loss.cross_entropy: expected scalar type Long"):
            fused_loss.cross_entropy(x, t, **kw)
        return
    _same(fused_loss.cross_entropy(x, t, **kw), expected, float64_reference(F.cross_entropy, x, t, **kw))


def test_kdim_weight_of_c_elements_in_any_shape():
    x, t, w = torch.randn(4, 3, 2), torch.randint(0, 3, (4, 2)), torch.rand(3, 1)
    _same(fused_loss.cross_entropy(x, t, w), F.cross_entropy(x, t, w), float64_reference(F.cross_entropy, x, t, w))


def test_elementwise_mean_is_torchs_deprecated_mean():
    x, t = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ours = fused_loss.cross_entropy(x, t, reduction="elementwise_mean")
    _same(ours, F.cross_entropy(x, t), float64_reference(F.cross_entropy, x, t))
    with pytest.warns(UserWarning, match="elementwise_mean"):
        fused_loss.SmoothL1Loss(reduction="elementwise_mean")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_huber_weight(reduction):
    x, y, w = torch.randn(5, 4), torch.randn(5, 4), torch.rand(5, 4)
    compare(lambda x, y, w, **kw: fused_loss.huber_loss(x, y, weight=w, **kw),
            lambda x, y, w, **kw: F.huber_loss(x, y, weight=w, **kw), [x, y, w], reduction=reduction, delta=0.7)
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        fused_loss.huber_loss(x, y, weight=torch.rand(4))


def test_bce_weights_requiring_grad_are_refused_at_the_forward_as_in_torch():
    x, y = torch.randn(3, 2, requires_grad=True), torch.rand(3, 2)
    for kw in [dict(weight=torch.rand(2, requires_grad=True)), dict(pos_weight=torch.rand(2, requires_grad=True))]:
        with pytest.raises(RuntimeError, match="not differentiable"):
            F.binary_cross_entropy_with_logits(x, y, **kw)
        with pytest.raises(RuntimeError, match="fused_loss.binary_cross_entropy_with_logits.*not differentiable"):
            fused_loss.binary_cross_entropy_with_logits(x, y, **kw)


def test_bce_target_gradient_at_minus_infinity_with_pos_weight():
    x, y, pw = torch.tensor([-math.inf, math.inf, -3.0]), torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0.1])
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            reduction="none", pos_weight=pw)


@pytest.mark.parametrize("x", [math.inf, -math.inf, 30.0])
def test_focal_gamma_zero_at_infinite_logits(x):
    """The input's gradient: torch's pow backward drops the (1 - p_t)^0 term, so no inf * 0."""
    from fused_loss import reference

    def grad(fn, xs, ys):
        xs = xs.clone().requires_grad_()
        return torch.autograd.grad(fn(xs, ys, gamma=0.0, alpha=0.25, reduction="sum"), xs)[0]

    xs, ys = torch.tensor([x, 1.0]), torch.tensor([0.5, 0.3])
    grads = [grad(fn, xs, ys) for fn in (fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss)]
    assert_close_to_torch(grads[0], grads[1], float64_reference(grad, reference.sigmoid_focal_loss, xs, ys), "grad",
                          tol=dict(atol=1e-5, rtol=1.3e-6))  # torch.testing.assert_close's float32 default, kept
    assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("xd,wd", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_huber_weight_promotes_the_result_as_torch(xd, wd):
    x, y, w = torch.randn(4, 3).to(xd), torch.randn(4, 3).to(xd), torch.rand(4, 3).to(wd)
    ours, theirs = fused_loss.huber_loss(x, y, weight=w), F.huber_loss(x, y, weight=w)
    assert ours.dtype == theirs.dtype
    # torch rounds the unweighted loss to the input's dtype first; ours computes in the promoted one
    ref = F.huber_loss(x.double(), y.double(), weight=w.double())
    assert abs(ours.double() - ref) <= abs(theirs.double() - ref) + 1e-6


def test_kdim_scalar_weight_of_one_class():
    x, t, w = torch.randn(2, 1, 3), torch.zeros(2, 3, dtype=torch.long), torch.tensor(0.7)
    _same(fused_loss.cross_entropy(x, t, w), F.cross_entropy(x, t, w))
