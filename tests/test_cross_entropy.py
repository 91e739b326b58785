"""fused_loss.cross_entropy against torch.nn.functional.cross_entropy: values, gradients,
dtypes, errors and edge cases."""
import pytest
import torch
import torch.nn.functional as F

import fused_loss
from fused_loss.reference import cross_entropy as reference
from helpers import REDUCED, assert_close_to_torch, compare, float64_reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
# (input shape) -- (N, C), K-dimensional (N, C, d1, ..., dk) and unbatched (C,)
SHAPES = [(13, 37), (1, 1), (7, 1), (64, 1000), (3, 70001), (4, 5, 3), (2, 37, 9, 5), (3, 17, 33), (37,)]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 2},
    "smooth": {"label_smoothing": 0.1},
    "smooth_weight_ignore": {"weight": True, "ignore_index": 1, "label_smoothing": 0.25},
    "ignore_default": {"ignore_index": -100, "mark_ignored": True},
}
# torch.testing.assert_close's float32 default, kept where a test compared with it (tighter than helpers.TOL)
ASSERT_CLOSE = dict(atol=1e-5, rtol=1.3e-6)


def make_case(shape, dtype, opts, probabilities=False, scale=3.0):
    """Logits, target and keyword arguments for one case."""
    opts = dict(opts)
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    classes = shape[0] if len(shape) == 1 else shape[1]
    row_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if probabilities:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, dim=0 if len(shape) == 1 else 1).to(dtype)
    else:
        t = torch.randint(0, classes, row_shape)
        ii = opts.get("ignore_index")
        if opts.pop("mark_ignored", False) and t.numel() > 1:
            t.view(-1)[::3] = ii  # every third target ignored
        elif ii is not None and ii < classes and t.numel() > 0:
            t.view(-1)[0] = ii
    if opts.pop("weight", False):
        opts["weight"] = (torch.rand(classes, dtype=torch.float64) + 0.1).to(dtype)
    return x, t, opts


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_class_targets_float32(shape, option, reduction):
    x, t, kw = make_case(shape, torch.float32, OPTIONS[option])
    compare(fused_loss.cross_entropy, reference, [x, t], reduction=reduction, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(13, 37), (64, 1000), (2, 37, 9, 5), (37,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_class_targets_dtypes(dtype, shape, option, reduction):
    x, t, kw = make_case(shape, dtype, OPTIONS[option])
    out, _ = compare(fused_loss.cross_entropy, reference, [x, t], reduction=reduction, **kw)
    assert out.dtype == dtype


PROB_OPTIONS = {"plain": {}, "weight": {"weight": True}, "smooth": {"label_smoothing": 0.2},
                "smooth_weight": {"weight": True, "label_smoothing": 0.3}}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(PROB_OPTIONS))
@pytest.mark.parametrize("shape", [(13, 37), (1, 1), (3, 70001), (4, 5, 3), (2, 37, 9, 5), (37,)], ids=str)
def test_probability_targets_float32(shape, option, reduction):
    x, t, kw = make_case(shape, torch.float32, PROB_OPTIONS[option], probabilities=True)
    compare(fused_loss.cross_entropy, reference, [x, t], reduction=reduction, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(PROB_OPTIONS))
@pytest.mark.parametrize("shape", [(13, 37), (2, 37, 9, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_probability_targets_dtypes(dtype, shape, option, reduction):
    x, t, kw = make_case(shape, dtype, PROB_OPTIONS[option], probabilities=True)
    compare(fused_loss.cross_entropy, reference, [x, t], reduction=reduction, **kw)


def _grad_of(fn, wrt, *args, **kw):
    """The gradient of fn(*args, **kw) with respect to args[wrt] alone (a fresh leaf copy)."""
    args = [a.detach().clone() if torch.is_tensor(a) else a for a in args]
    args[wrt].requires_grad_()
    return torch.autograd.grad(fn(*args, **kw), args[wrt])[0]


def test_probability_targets_input_grad_only_and_target_grad_only():
    x, t, _ = make_case((6, 11), torch.float32, {}, probabilities=True)
    for wrt, kw in [(0, {}), (1, dict(label_smoothing=0.1))]:
        ours, theirs = _grad_of(fused_loss.cross_entropy, wrt, x, t, **kw), _grad_of(F.cross_entropy, wrt, x, t, **kw)
        assert_close_to_torch(ours, theirs, float64_reference(_grad_of, F.cross_entropy, wrt, x, t, **kw),
                              f"grad of argument {wrt}", tol=ASSERT_CLOSE)


def test_probability_targets_promote_like_torch():
    x = torch.randn(4, 5)
    t = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    ours, theirs = fused_loss.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("probabilities", [False, True])
def test_large_k_dimensional_odd_shape(probabilities):
    """(3, 423, 32000): C = 423 classes over 32000 positions, as torch reads that shape."""
    opts = {} if probabilities else OPTIONS["smooth_weight_ignore"]
    x, t, kw = make_case((3, 423, 32000), torch.float32, opts, probabilities=probabilities)
    compare(fused_loss.cross_entropy, reference, [x, t], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocabulary_few_rows(dtype):
    x, t, kw = make_case((4, 128256), dtype, {"label_smoothing": 0.1})
    compare(fused_loss.cross_entropy, reference, [x, t], **kw)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extreme_logits(smoothing):
    x = torch.randn(16, 300).sign() * 1e4
    t = torch.randint(0, 300, (16,))
    compare(fused_loss.cross_entropy, reference, [x, t], label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(8, 50), (2, 50, 7)], ids=str)
def test_minus_inf_in_non_target_classes(shape, smoothing):
    x = torch.randn(shape)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    mask = torch.rand(shape) < 0.5
    mask.scatter_(1, t.unsqueeze(1), False)  # never the target
    x = x.masked_fill(mask, float("-inf"))
    compare(fused_loss.cross_entropy, reference, [x, t], label_smoothing=smoothing)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_logits_poison_their_row_like_torch(bad):
    x = torch.randn(4, 40)
    x[1, 7] = bad
    t = torch.randint(0, 40, (4,))
    compare(fused_loss.cross_entropy, reference, [x, t], reduction="none")


def test_non_contiguous_inputs():
    base = torch.randn(37, 20)
    x = base.t()  # (20, 37), column-major
    t = torch.randint(0, 37, (40,))[::2]
    compare(fused_loss.cross_entropy, reference, [x, t], weight=torch.rand(37), label_smoothing=0.1)
    x = torch.randn(9, 64)[:, ::2]
    compare(fused_loss.cross_entropy, reference, [x, torch.randint(0, 32, (9,))], reduction="none")
    x = torch.randn(2, 5, 6, 7).permute(0, 3, 1, 2)  # (2, 7, 5, 6): C = 7, strided
    t = torch.randint(0, 7, (2, 6, 5)).transpose(1, 2)
    compare(fused_loss.cross_entropy, reference, [x, t], reduction="sum")
    p = torch.softmax(torch.randn(20, 37), 1).t().contiguous().t()
    compare(fused_loss.cross_entropy, reference, [base.t().contiguous(), p])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("probabilities", [False, True])
def test_empty_batch(reduction, probabilities):
    x = torch.randn(0, 5, requires_grad=True)
    t = torch.softmax(torch.randn(0, 5), 1) if probabilities else torch.zeros(0, dtype=torch.long)
    ours, theirs = fused_loss.cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_targets_ignored(reduction, smoothing):
    x = torch.randn(6, 9)
    t = torch.full((6,), -100)
    out, (g, _) = compare(fused_loss.cross_entropy, reference, [x, t], reduction=reduction, label_smoothing=smoothing)
    if reduction == "mean":
        assert out.isnan()
    else:
        assert (g == 0).all()


def test_negative_label_smoothing_is_no_smoothing_like_torch():
    x, t = torch.randn(5, 7), torch.randint(0, 7, (5,))
    assert_close_to_torch(fused_loss.cross_entropy(x, t, label_smoothing=-0.3), F.cross_entropy(x, t),
                          float64_reference(F.cross_entropy, x, t), "loss", tol=ASSERT_CLOSE)


def test_uint8_targets_accepted_like_torch():
    x, t = torch.randn(5, 7), torch.randint(0, 7, (5,))
    assert_close_to_torch(fused_loss.cross_entropy(x, t.to(torch.uint8)), F.cross_entropy(x, t),
                          float64_reference(F.cross_entropy, x, t), "loss", tol=ASSERT_CLOSE)


def test_legacy_positional_arguments():
    x, t, w = torch.randn(5, 7), torch.randint(0, 7, (5,)), torch.rand(7)
    # (input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    args = (w, False, 3, None, "mean", 0.1)
    assert_close_to_torch(fused_loss.cross_entropy(x, t, *args), F.cross_entropy(x, t, *args),
                          float64_reference(F.cross_entropy, x, t, *args), "loss", tol=ASSERT_CLOSE)


# --- errors --------------------------------------------------------------------------------

def _raises_like_torch(make_args, match, **kw):
    args = make_args()
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(*args, **kw)
    with pytest.raises(type(theirs.value), match=match):
        fused_loss.cross_entropy(*args, **kw)


@pytest.mark.parametrize("target", [7, -3, 1000])
@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 3)], ids=str)
def test_out_of_range_target_raises_naming_target_and_classes(shape, target):
    def args():
        t = torch.randint(0, 5, (shape[0], *shape[2:]))
        t.view(-1)[-1] = target
        return torch.randn(shape), t
    _raises_like_torch(args, rf"Target {target} is out of bounds.*\[0, 5\)")


def test_out_of_range_target_raises_in_backward_op_too():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    lse = torch.ops.fused_loss.cross_entropy_forward(x, t, None, 1, -100, 0.0, False)[1]
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        torch.ops.fused_loss.cross_entropy_backward(torch.ones(()), x, torch.tensor([0, 1, 2, 9]), None, lse, 1, -100, 0.0)


ERROR_CASES = {
    "batch_mismatch": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2])), {}, "batch_size"),
    "kdim_mismatch": (lambda: (torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long)), {}, "target size"),
    "float_class_target": (lambda: (torch.randn(4, 5), torch.tensor([0.0, 1, 2, 3])), {}, "Long or Byte"),
    "int32_class_target": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3], dtype=torch.int32)), {}, "Long or Byte"),
    "weight_length": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])), {"weight": torch.ones(3)}, "for all 5 classes"),
    "weight_2d": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])), {"weight": torch.ones(1, 5)}, "for all 5 classes"),
    "weight_dtype": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])),
                     {"weight": torch.ones(5, dtype=torch.float64)}, "expected scalar type Float but found Double"),
    "reduction": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])), {"reduction": "avg"}, "not a valid value"),
    "smoothing_above_one": (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3])), {"label_smoothing": 1.5},
                            "between 0.0 and 1.0"),
    "prob_ignore_index": (lambda: (torch.randn(4, 5), torch.rand(4, 5)), {"ignore_index": 3}, "ignore_index is not supported"),
    "prob_integer_target": (lambda: (torch.randn(4, 5), torch.ones(4, 5, dtype=torch.long)), {}, "floating point type"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_like_torch(case):
    make_args, kw, match = ERROR_CASES[case]
    _raises_like_torch(make_args, match, **kw)


def test_integer_input_raises():
    with pytest.raises(RuntimeError, match="floating point input"):
        fused_loss.cross_entropy(torch.ones(4, 5, dtype=torch.long), torch.tensor([0, 1, 2, 3]))


def test_zero_dim_input_raises():
    with pytest.raises(ValueError, match="0-dim"):
        fused_loss.cross_entropy(torch.tensor(1.0), torch.tensor(0))


# --- determinism, gradcheck, module, output cache -----------------------------------------------

@pytest.mark.parametrize("case", ["rows", "long_rows", "columns", "prob_rows", "prob_columns"])
def test_bitwise_identical_for_1_and_2_threads(case):
    shape = {"rows": (300, 1000), "long_rows": (3, 100003), "columns": (3, 37, 500),
             "prob_rows": (5, 70001), "prob_columns": (3, 37, 500)}[case]
    probabilities = case.startswith("prob")
    x, t, kw = make_case(shape, torch.float32, {} if probabilities else OPTIONS["smooth_weight_ignore"], probabilities)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xg = x.clone().requires_grad_()
            loss = fused_loss.cross_entropy(xg, t, **kw)
            loss.backward()
            results.append((loss.detach(), xg.grad))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("case", ["class", "class_options", "kdim", "prob"])
def test_gradcheck_float64(case):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    if case == "class":
        args, kw = (x, torch.tensor([0, 4, 2])), {}
    elif case == "class_options":
        args = (x, torch.tensor([0, 1, 2]))
        kw = dict(weight=torch.rand(5, dtype=torch.float64) + 0.1, ignore_index=1, label_smoothing=0.3)
    elif case == "kdim":
        x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
        args, kw = (x, torch.tensor([[0, 3, 1], [2, 2, 0]])), dict(reduction="none", label_smoothing=0.1)
    else:
        t = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1).requires_grad_()
        args, kw = (x, t), dict(weight=torch.rand(5, dtype=torch.float64), label_smoothing=0.2)
    assert torch.autograd.gradcheck(lambda *a: fused_loss.cross_entropy(*a, **kw), args)


def test_module_matches_torch_module():
    w = torch.rand(11)
    ours = fused_loss.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = torch.randn(8, 11), torch.randint(0, 11, (8,))
    compare(ours, theirs, [x, t])


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="not a valid value"):
        fused_loss.CrossEntropyLoss(reduction="avg")


def test_cached_gradients_never_alias():
    """Large gradients come from the output cache: live ones must be distinct buffers, and a
    reused buffer must hold the new values."""
    x, t = torch.randn(64, 32768), torch.randint(0, 32768, (64,))  # 8 MiB: cached
    grads = []
    for scale in (1.0, 2.0, 3.0):
        xg = (x * scale).requires_grad_()
        fused_loss.cross_entropy(xg, t).backward()
        grads.append(xg.grad)
    assert len({g.data_ptr() for g in grads}) == 3
    for scale, g in zip((1.0, 2.0, 3.0), grads):
        xr = (x * scale).requires_grad_()
        F.cross_entropy(xr, t).backward()
        assert_close_to_torch(g, xr.grad, float64_reference(_grad_of, F.cross_entropy, 0, x * scale, t),
                              f"grad at scale {scale}", tol=ASSERT_CLOSE)
    del grads, g
    assert torch.ops.fused_loss.empty_cache() >= 0
