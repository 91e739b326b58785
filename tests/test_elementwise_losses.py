"""BCE-with-logits, smooth L1, Huber (against torch) and sigmoid focal loss (against the
torchvision formula in fused_loss.reference): values, gradients w.r.t. input and target,
broadcasting, dtypes, errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_loss
from fused_loss import reference
from helpers import compare

REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [(64, 37), (1,), (5,), (3, 4, 5), (2, 3, 1000), (70001,), ()]
DTYPES = [torch.float64, torch.bfloat16, torch.float16]


def logits_and_targets(shape, dtype=torch.float32, soft=True):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    y = torch.rand(shape, dtype=torch.float64) if soft else torch.randint(0, 2, shape).double()
    return x, y.to(dtype)


# --- BCE with logits ------------------------------------------------------------------------

BCE_OPTIONS = {
    "plain": lambda s, d: {},
    "pos_weight_classes": lambda s, d: {"pos_weight": (torch.rand(s[-1:], dtype=torch.float64) * 3).to(d)},
    "weight_classes": lambda s, d: {"weight": torch.rand(s[-1:], dtype=torch.float64).to(d)},
    "weight_full_and_pos_weight": lambda s, d: {"weight": torch.rand(s, dtype=torch.float64).to(d),
                                                "pos_weight": (torch.rand(s[-1:], dtype=torch.float64) * 3).to(d)},
    "weight_per_row": lambda s, d: {"weight": torch.rand((*s[:-1], 1), dtype=torch.float64).to(d)},
    "scalar_weights": lambda s, d: {"weight": torch.tensor(0.7, dtype=d), "pos_weight": torch.tensor([2.0], dtype=d)},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(BCE_OPTIONS))
@pytest.mark.parametrize("shape", [s for s in SHAPES if s], ids=str)
def test_bce_with_logits_float32(shape, option, reduction):
    x, y = logits_and_targets(shape)
    kw = BCE_OPTIONS[option](shape, torch.float32)
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            reduction=reduction, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight_full_and_pos_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bce_with_logits_dtypes(dtype, option, reduction):
    x, y = logits_and_targets((16, 33), dtype)
    kw = BCE_OPTIONS[option]((16, 33), dtype)
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            reduction=reduction, **kw)


def test_bce_weight_broadcast_over_a_middle_dimension():
    """(N, 1, W) over (N, C, W): the operand layout that is not one block of dimensions."""
    x, y = logits_and_targets((3, 4, 5))
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            weight=torch.rand(3, 1, 5), pos_weight=torch.rand(4, 1) + 0.5, reduction="none")


def test_bce_extreme_logits_and_hard_targets():
    x = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4]).repeat(2)
    y = torch.cat([torch.zeros(9), torch.ones(9)])
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            pos_weight=torch.tensor([3.0]), reduction="none")


def test_nan_and_inf_logits_like_torch():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 2.0, -3.0])
    y = torch.tensor([0.3, 1.0, 0.0, 0.2, 1.0, 0.0])
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            reduction="none")
    compare(fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss, [x[[0, 3, 4, 5]], y[[0, 3, 4, 5]]])


def test_bce_non_contiguous_and_promotion():
    x = torch.randn(40, 30).t()
    y = torch.rand(30, 80)[:, ::2]
    compare(fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, [x, y],
            pos_weight=torch.rand(40))
    y64 = torch.rand(30, 40, dtype=torch.float64)
    assert fused_loss.binary_cross_entropy_with_logits(x, y64).dtype == F.binary_cross_entropy_with_logits(x, y64).dtype


BCE_ERRORS = {
    "target_shape": (lambda: (torch.randn(4, 5), torch.rand(4, 1)), {}, "must be the same as input size"),
    "weight_shape": (lambda: (torch.randn(4, 5), torch.rand(4, 5)), {"weight": torch.rand(3)}, "must match the size"),
    "weight_grows_output": (lambda: (torch.randn(4, 5), torch.rand(4, 5)), {"weight": torch.rand(2, 4, 5)},
                            "doesn't match the broadcast shape"),
    "pos_weight_shape": (lambda: (torch.randn(4, 5), torch.rand(4, 5)), {"pos_weight": torch.rand(4)}, "must match the size"),
    "integer_input": (lambda: (torch.ones(4, 5, dtype=torch.long), torch.rand(4, 5)), {}, "(?i)floating point|not implemented"),
    "integer_target": (lambda: (torch.randn(4, 5), torch.ones(4, 5, dtype=torch.long)), {}, "can't be cast"),
    "reduction": (lambda: (torch.randn(4, 5), torch.rand(4, 5)), {"reduction": "avg"}, "not a valid value"),
}


@pytest.mark.parametrize("case", list(BCE_ERRORS))
def test_bce_bad_input_raises_like_torch(case):
    make, kw, match = BCE_ERRORS[case]
    with pytest.raises(Exception) as theirs:
        F.binary_cross_entropy_with_logits(*make(), **kw)
    with pytest.raises(type(theirs.value), match=match):
        fused_loss.binary_cross_entropy_with_logits(*make(), **kw)


# --- smooth L1 and Huber --------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0, 5.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_smooth_l1_float32(shape, beta, reduction):
    x, y = logits_and_targets(shape)
    compare(fused_loss.smooth_l1_loss, F.smooth_l1_loss, [x, y], reduction=reduction, beta=beta)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("delta", [1.0, 0.3, 5.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_huber_float32(shape, delta, reduction):
    x, y = logits_and_targets(shape)
    compare(fused_loss.huber_loss, F.huber_loss, [x, y], reduction=reduction, delta=delta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_regression_losses_dtypes(dtype, reduction):
    x, y = logits_and_targets((16, 33), dtype)
    compare(fused_loss.smooth_l1_loss, F.smooth_l1_loss, [x, y], reduction=reduction, beta=0.5)
    compare(fused_loss.huber_loss, F.huber_loss, [x, y], reduction=reduction, delta=0.5)


def test_smooth_l1_beta_zero_has_no_nan_even_at_ties():
    x = torch.tensor([0.0, 1.0, -2.0, 3.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.0, 5.0], requires_grad=True)  # two exact ties
    loss = fused_loss.smooth_l1_loss(x, y, beta=0.0, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    compare(fused_loss.smooth_l1_loss, F.smooth_l1_loss, [x, y], beta=0.0, reduction="none")


def test_regression_broadcast_warns_like_torch():
    x, y = torch.randn(4, 5), torch.rand(5)
    for ours, theirs in ((fused_loss.smooth_l1_loss, F.smooth_l1_loss), (fused_loss.huber_loss, F.huber_loss)):
        with pytest.warns(UserWarning, match="different to the input size"):
            compare(ours, theirs, [x, y], reduction="none")
        with pytest.warns(UserWarning, match="different to the input size"):
            compare(ours, theirs, [y, x])


def test_regression_promotion_like_torch():
    x, y = torch.randn(4, 5), torch.rand(4, 5, dtype=torch.float64)
    assert fused_loss.smooth_l1_loss(x, y).dtype == F.smooth_l1_loss(x, y).dtype == torch.float64
    assert fused_loss.huber_loss(x, y).dtype == F.huber_loss(x, y).dtype == torch.float32


REGRESSION_ERRORS = [
    (fused_loss.smooth_l1_loss, F.smooth_l1_loss, {"beta": -1.0}, "negative values for beta"),
    (fused_loss.huber_loss, F.huber_loss, {"delta": 0.0}, "non-positive values for delta"),
    (fused_loss.huber_loss, F.huber_loss, {"delta": -2.0}, "non-positive values for delta"),
    (fused_loss.smooth_l1_loss, F.smooth_l1_loss, {"reduction": "avg"}, "not a valid value"),
]


@pytest.mark.parametrize("ours,theirs,kw,match", REGRESSION_ERRORS)
def test_regression_bad_arguments_raise_like_torch(ours, theirs, kw, match):
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    with pytest.raises(Exception) as e:
        theirs(x, y, **kw)
    with pytest.raises(type(e.value), match=match):
        ours(x, y, **kw)


@pytest.mark.parametrize("fn", [fused_loss.smooth_l1_loss, fused_loss.huber_loss])
def test_regression_shape_mismatch_and_integer_input_raise(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="must match the size"):
            fn(torch.randn(4, 5), torch.rand(3))
    with pytest.raises(RuntimeError):
        fn(torch.ones(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long))


# --- sigmoid focal loss -------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.0), (0.75, 1.5), (0.25, 3.0)])
@pytest.mark.parametrize("shape", [(64, 37), (3, 4, 5), (70001,)], ids=str)
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_focal_loss_float32(soft, shape, alpha, gamma, reduction):
    x, y = logits_and_targets(shape, soft=soft)
    compare(fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss, [x, y], alpha=alpha, gamma=gamma,
            reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_focal_loss_dtypes(dtype):
    x, y = logits_and_targets((16, 33), dtype, soft=False)
    compare(fused_loss.sigmoid_focal_loss, reference.sigmoid_focal_loss, [x, y], reduction="sum")


def test_sigmoid_focal_loss_bad_reduction():
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction'"):
        fused_loss.sigmoid_focal_loss(torch.randn(3), torch.rand(3), reduction="avg")


# --- shared: modules, gradcheck, determinism, empty inputs ---------------------------------------

def test_modules_match_torch_modules():
    x, y = logits_and_targets((8, 11))
    pw = torch.rand(11) * 2
    pairs = [(fused_loss.BCEWithLogitsLoss(pos_weight=pw, reduction="sum"), torch.nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")),
             (fused_loss.SmoothL1Loss(beta=0.4), torch.nn.SmoothL1Loss(beta=0.4)),
             (fused_loss.HuberLoss(delta=0.4, reduction="none"), torch.nn.HuberLoss(delta=0.4, reduction="none"))]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        compare(ours, theirs, [x, y])
    with pytest.raises(ValueError):
        fused_loss.HuberLoss(delta=0.0)


_W, _PW = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
GRADCHECK = {
    "bce": lambda x, y: fused_loss.binary_cross_entropy_with_logits(x, y, weight=_W, pos_weight=_PW),
    "smooth_l1": lambda x, y: fused_loss.smooth_l1_loss(x, y, beta=0.7, reduction="none"),
    "huber": lambda x, y: fused_loss.huber_loss(x, y, delta=0.7, reduction="sum"),
    "focal": lambda x, y: fused_loss.sigmoid_focal_loss(x, y, gamma=1.5, reduction="mean"),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(name):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GRADCHECK[name], (x, y))


@pytest.mark.parametrize("name", ["bce", "smooth_l1", "focal"])
def test_bitwise_identical_for_1_and_2_threads(name):
    pos_weight = torch.rand(1000)
    fn = {"bce": lambda x, y: fused_loss.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight),
          "smooth_l1": lambda x, y: fused_loss.smooth_l1_loss(x, y),
          "focal": lambda x, y: fused_loss.sigmoid_focal_loss(x, y, reduction="mean")}[name]
    torch.manual_seed(1)
    x, y = logits_and_targets((300, 1000))
    results, old = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xg = x.clone().requires_grad_()
            loss = fn(xg, y)
            loss.backward()
            results.append((loss.detach(), xg.grad))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs(reduction):
    x, y = torch.randn(0, 5), torch.rand(0, 5)
    for ours, theirs in ((fused_loss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
                         (fused_loss.smooth_l1_loss, F.smooth_l1_loss), (fused_loss.huber_loss, F.huber_loss)):
        torch.testing.assert_close(ours(x, y, reduction=reduction), theirs(x, y, reduction=reduction), equal_nan=True)


@pytest.mark.parametrize("target", [0.0, 0.3, 1.0])
def test_bce_float32_error_within_a_few_eps(target):
    """The loss's log1p(exp(-|x|)) (a bounded-domain log1p on the CPU, see vec_math.h) keeps
    each float32 value within a few eps of float64, beside torch's own error."""
    x = torch.linspace(-20, 20, 200001)
    y = torch.full_like(x, target)
    pw = torch.full((1,), 2.5)
    for kw in ({}, {"pos_weight": pw}):
        ref = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none",
                                                 **{k: v.double() for k, v in kw.items()})
        err_ours = (fused_loss.binary_cross_entropy_with_logits(x, y, reduction="none", **kw).double() - ref).abs()
        err_torch = (F.binary_cross_entropy_with_logits(x, y, reduction="none", **kw).double() - ref).abs()
        bad = err_ours > 2 * err_torch + 6 * torch.finfo(torch.float32).eps * ref.abs()
        assert not bad.any(), (x[bad][:5], (err_ours / ref.abs())[bad].max())
