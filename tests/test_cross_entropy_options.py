"""Cross-entropy's LLM options (softcap, temperature, z_loss) and return_stats, against plain
torch formulas written here: the logits shaped with torch ops, then F.cross_entropy, plus
z_loss * torch.logsumexp(z)^2 per token weighted like the token's cross-entropy term."""
import math

import pytest
import torch
import torch.nn.functional as F

import fused_loss
from helpers import assert_close_to_torch, compare, float64_reference

OPTIONS = [dict(softcap=4.0), dict(temperature=0.7), dict(z_loss=1e-2),
           dict(softcap=3.0, temperature=1.7, z_loss=0.05)]
EXTRAS = [dict(), dict(label_smoothing=0.1), dict(weight=True), dict(weight=True, label_smoothing=0.2, ignore_index=1),
          dict(ignore_index=0)]
# torch.testing.assert_close's float32 default, kept where a test compared with it (tighter than helpers.TOL)
ASSERT_CLOSE = dict(atol=1e-5, rtol=1.3e-6)


def torch_formula(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None,
                  temperature=1.0, z_loss=0.0):
    """The options written with torch ops; classes in dim 1 (dim 0 for a (C,) input)."""
    z = x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    loss = F.cross_entropy(z, t, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    cls = 0 if x.dim() == 1 else 1
    lse = torch.logsumexp(z, cls)
    if t.shape == x.shape:  # probabilities: every token weighs 1
        w = torch.ones_like(lse)
    else:
        keep = t != ignore_index
        w = keep.to(lse.dtype)
        if weight is not None:
            w = w * weight[torch.where(keep, t, 0)]
    terms = z_loss * w * lse ** 2
    if reduction == "none":
        return loss + terms
    return loss + (terms.sum() if reduction == "sum" else terms.sum() / w.sum())


def _case(layout, classes, dtype, extras, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {"rows": (37,), "unbatched": (), "kdim": (5, 4), "probs": (23,), "probs_kdim": (3, 5)}[layout]
    shape = (*rows[:1], classes, *rows[1:]) if rows else (classes,)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    kw = dict(extras)
    if layout.startswith("probs"):
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 0 if x.dim() == 1 else 1).to(dtype)
        kw.pop("ignore_index", None)
    else:
        t = torch.randint(0, classes, (rows[0], *rows[1:]) if rows else (), generator=g)
        if "ignore_index" in kw and t.dim() > 0:
            t.view(-1)[::3] = kw["ignore_index"]
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return x, t, kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extras", EXTRAS, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("layout", ["rows", "unbatched", "kdim", "probs", "probs_kdim"])
def test_options_match_torch_formula(layout, options, extras, reduction):
    x, t, kw = _case(layout, 50, torch.float32, extras)
    compare(fused_loss.cross_entropy, torch_formula, [x, t], reduction=reduction, **kw, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_in_other_dtypes(dtype, reduction):
    x, t, kw = _case("rows", 300, dtype, dict(weight=True, label_smoothing=0.1, ignore_index=2))
    compare(fused_loss.cross_entropy, torch_formula, [x, t], reduction=reduction, **kw, **OPTIONS[-1])


@pytest.mark.parametrize("shape", [(3, 70001), (40, 33000)], ids=str)  # several chunks; the one-pass path
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_options_on_long_rows(shape, reduction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 5
    t = torch.randint(0, shape[1], (shape[0],), generator=g)
    compare(fused_loss.cross_entropy, torch_formula, [x, t], reduction=reduction, label_smoothing=0.1,
            **OPTIONS[-1])


@pytest.mark.parametrize("layout", ["rows", "kdim", "probs"])
def test_gradcheck_with_every_option(layout):
    x, t, kw = _case(layout, 6, torch.float64, dict(weight=True, label_smoothing=0.15))
    x.requires_grad_()
    for reduction in ["mean", "none"]:
        fn = lambda x: fused_loss.cross_entropy(x, t, reduction=reduction, **kw, **OPTIONS[-1])  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("softcap", [3.0, None])
@pytest.mark.parametrize("rows, classes", [(37, 500), (40, 33000), (5, 9000)])  # one pass (2 chunks); split rows
def test_the_gradient_written_in_the_forward_pass_matches_the_recomputed_one(rows, classes, softcap):
    """Bit for bit: kept block exponentials, recomputed ones, and any thread count."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, classes, generator=g) * 4
    t = torch.randint(0, classes, (rows,), generator=g)
    t[::4] = 3
    w = torch.rand(classes, generator=g) + 0.5
    ops = torch.ops.fused_loss
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _, stats, in_pass = ops.cross_entropy_forward(x, t, w, 1, 3, 0.1, True, softcap, 1.7, 0.05)
            grads += [in_pass.clone(),
                      ops.cross_entropy_backward(torch.ones(()), x, t, w, stats, 1, 3, 0.1, softcap, 1.7, 0.05)]
    finally:
        torch.set_num_threads(threads)
    assert grads[0].shape == x.shape
    for other in grads[1:]:
        assert torch.equal(grads[0], other)


# --- statistics ---------------------------------------------------------------------------

def _torch_stats(x, t, weight, ignore_index, reduction, softcap, temperature, z_loss):
    cls = 1
    z = x.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lse = torch.logsumexp(z, cls)
    p = torch.softmax(z, cls)
    entropy = -(p * torch.where(p > 0, torch.log(p), 0)).sum(cls)
    z_term = torch_formula(x.double(), t, None if weight is None else weight.double(), ignore_index, reduction,
                           0.0, softcap, temperature, z_loss) - \
        torch_formula(x.double(), t, None if weight is None else weight.double(), ignore_index, reduction, 0.0,
                      softcap, temperature, 0.0)
    if t.shape == x.shape:  # the target's most probable class
        return z_term, lse, entropy, x.argmax(cls) == t.argmax(cls)
    keep = t != ignore_index
    correct = (z.argmax(cls) == t) & keep
    return z_term, torch.where(keep, lse, 0), torch.where(keep, entropy, 0), correct


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["rows", "kdim", "probs"])
@pytest.mark.parametrize("options", [dict(), dict(softcap=4.0, temperature=0.8, z_loss=1e-3), dict(z_loss=0.1)],
                         ids=str)
def test_stats_match_torch(options, layout, reduction):
    x, t, kw = _case(layout, 20, torch.float32, dict(weight=True, ignore_index=2))
    t_correct = x.argmax(1)  # make some predictions right
    if layout != "probs":
        t = torch.where(torch.arange(t.numel()).view(t.shape) % 2 == 0, t_correct, t)
        t.view(-1)[::5] = 2
    opts = dict(softcap=None, temperature=1.0, z_loss=0.0) | options
    loss, stats = fused_loss.cross_entropy(x, t, reduction=reduction, return_stats=True, **kw, **options)
    torch.testing.assert_close(loss, fused_loss.cross_entropy(x, t, reduction=reduction, **kw, **options))
    z_term, lse, entropy, correct = _torch_stats(x, t, kw.get("weight"), kw.get("ignore_index", -100), reduction,
                                                 **opts)
    assert stats.lse.dtype == torch.float32 and stats.lse.shape == lse.shape
    torch.testing.assert_close(stats.lse.double(), lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.z_loss.double(), z_term.to(loss.dtype).double(), rtol=1e-4, atol=1e-6)
    assert stats.z_loss.dtype == loss.dtype and stats.z_loss.shape == loss.shape
    assert stats.correct.dtype == torch.bool and torch.equal(stats.correct, correct)
    keep = torch.ones_like(correct) if layout == "probs" else t != 2
    if layout != "probs":
        assert correct.any() and not correct.all()
    assert stats.accuracy.item() == pytest.approx(correct.sum().item() / keep.sum().item())
    for field in stats:
        assert field is None or not field.requires_grad


def _entropy(z):
    p = z.softmax(1)
    return -(p * p.log()).sum(1)


def test_stats_of_masked_logits_and_ties():
    x = torch.randn(4, 30)
    x[:, 10:] = -math.inf  # masked vocabulary: entropy over the live classes only, never NaN
    x[3, 0] = x[3, 1] = 50.0  # a tie for the max counts as correct
    t = torch.tensor([x[0, :10].argmax().item(), 11, 5, 1])
    _, stats = fused_loss.cross_entropy(x, t, return_stats=True, reduction="none")
    live = x[:, :10]
    assert_close_to_torch(stats.entropy, _entropy(live), float64_reference(_entropy, live), "entropy", tol=ASSERT_CLOSE)
    assert_close_to_torch(stats.lse, torch.logsumexp(live, 1), float64_reference(torch.logsumexp, live, 1), "lse",
                          tol=ASSERT_CLOSE)
    assert stats.correct.tolist() == [True, False, bool(t[2] == live[2].argmax()), True]


def test_stats_of_a_single_row_and_under_no_grad():
    x, t = torch.randn(12), torch.tensor(4)
    loss, stats = fused_loss.cross_entropy(x, t, return_stats=True, reduction="none", temperature=2.0)
    assert loss.shape == () and stats.lse.shape == () and stats.correct.shape == ()
    lse = lambda x: torch.logsumexp(x / 2, 0)  # noqa: E731
    assert_close_to_torch(stats.lse, lse(x), float64_reference(lse, x), "lse", tol=ASSERT_CLOSE)
    with torch.no_grad():
        loss2, stats2 = fused_loss.cross_entropy(x.unsqueeze(0), t.unsqueeze(0), return_stats=True, temperature=2.0)
    torch.testing.assert_close(stats2.lse, stats.lse.unsqueeze(0))


# --- API ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(softcap=0.0), dict(softcap=-1.0), dict(softcap=math.inf), dict(temperature=0.0),
                                 dict(temperature=math.nan), dict(z_loss=-1e-4), dict(z_loss=math.inf)], ids=str)
def test_bad_options_raise(bad):
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="fused_loss.cross_entropy"):
        fused_loss.cross_entropy(x, t, **bad)
    name, value = next(iter(bad.items()))
    args = dict(softcap=None, temperature=1.0, z_loss=0.0) | {name: value}
    with pytest.raises(RuntimeError, match="fused_loss.cross_entropy"):
        torch.ops.fused_loss.cross_entropy_forward(x, t, None, 1, -100, 0.0, False, args["softcap"],
                                                   args["temperature"], args["z_loss"])


def test_options_are_keyword_only_and_off_by_default():
    x, t = torch.randn(6, 9), torch.randint(0, 9, (6,))
    with pytest.raises(TypeError):
        fused_loss.cross_entropy(x, t, None, None, -100, None, "mean", 0.0, 5.0)
    assert torch.equal(fused_loss.cross_entropy(x, t, softcap=None, temperature=1.0, z_loss=0.0),
                       fused_loss.cross_entropy(x, t))


def test_module_takes_the_options():
    x, t = torch.randn(8, 11, requires_grad=True), torch.randint(0, 11, (8,))
    opts = dict(softcap=5.0, temperature=1.3, z_loss=1e-3)
    module = fused_loss.CrossEntropyLoss(label_smoothing=0.1, **opts)
    compare(module, lambda x, t: torch_formula(x, t, label_smoothing=0.1, **opts), [x, t])
    loss, stats = fused_loss.CrossEntropyLoss(return_stats=True, **opts)(x, t)
    assert isinstance(stats, fused_loss.CrossEntropyStats)
    with pytest.raises(ValueError, match="fused_loss"):
        fused_loss.CrossEntropyLoss(temperature=-1.0)


def test_compile_fullgraph_with_every_option_and_stats():
    torch._dynamo.reset()
    x, t = torch.randn(16, 100), torch.randint(0, 100, (16,))
    t[3] = -100
    kw = dict(weight=torch.rand(100) + 0.5, label_smoothing=0.1, softcap=6.0, temperature=0.9, z_loss=1e-3,
              return_stats=True)

    def step(x):
        loss, stats = fused_loss.cross_entropy(x, t, **kw)
        return loss, stats.lse, stats.entropy, stats.accuracy

    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, got = step(xe), compiled(xc)
    eager[0].backward()
    got[0].backward()
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_opcheck_with_options():
    x = torch.randn(7, 13, requires_grad=True)
    t = torch.randint(0, 13, (7,))
    for reduction, compute_grad, stats_out in [(1, True, True), (0, False, False), (2, True, False)]:
        args = (x, t, torch.rand(13), reduction, -100, 0.1, compute_grad, 2.5, 0.8, 1e-2, stats_out)
        torch.library.opcheck(torch.ops.fused_loss.cross_entropy_forward, args)
        loss, stats, _ = torch.ops.fused_loss.cross_entropy_forward(*args)
        torch.library.opcheck(torch.ops.fused_loss.cross_entropy_backward,
                              (torch.ones_like(loss), x.detach(), t, args[2], stats[:2].detach(), reduction, -100,
                               0.1, 2.5, 0.8, 1e-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_tanh_is_accurate_across_its_range(dtype):
    """The kernels' own vector tanh: rows of one class have lse = z = softcap * tanh(x / softcap)."""
    cap = 5.0
    x = torch.linspace(-40 * cap, 40 * cap, 200001, dtype=torch.float64)
    x = torch.cat([x, torch.linspace(-3 * cap, 3 * cap, 200001, dtype=torch.float64)]).to(dtype)
    _, stats = fused_loss.cross_entropy(x.unsqueeze(1), torch.zeros(x.numel(), dtype=torch.long), softcap=cap,
                                        return_stats=True, reduction="none")
    exact = cap * torch.tanh(x.double() / cap)
    ulps = (stats.lse.double() - exact).abs() / torch.finfo(dtype).eps / exact.abs().clamp(min=1e-30)
    assert ulps.max() <= 8, ulps.max()


LAYOUTS = {  # the same rows as (N, C), as (N, C, 1) (composed options) and one by one as (C,)
    "rows": lambda x, t, **kw: fused_loss.cross_entropy(x, t, **kw),
    "kdim": lambda x, t, **kw: _squeeze_last(fused_loss.cross_entropy(x.unsqueeze(2), t.unsqueeze(1), **kw)),
}


def _squeeze_last(out):
    loss, stats = out
    return loss.squeeze(-1) if loss.dim() else loss, type(stats)(
        *[f if f.dim() == 0 or f.shape[-1:] != (1,) else f.squeeze(-1) for f in stats])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_correct_compares_the_logits_before_shaping(layout):
    """Softcap can round distinct logits to one value; `correct` compares the logits themselves,
    in every layout."""
    x = torch.tensor([[25.78347, 29.08850, 0.0], [3.0, 3.2, -1.0], [5.0, 5.0, 1.0]])
    t = torch.tensor([0, 0, 1])
    for dtype, cap in [(torch.float32, 3.0), (torch.bfloat16, 1.0)]:
        _, stats = LAYOUTS[layout](x.to(dtype), t, softcap=cap, temperature=1.3, return_stats=True, reduction="none")
        assert stats.correct.tolist() == [False, False, True]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_uint8_targets_are_never_wrapped_onto_ignore_index(layout):
    """-100 is 156 in uint8: class 156 must count as a class, as in the kernel."""
    x = torch.randn(2, 200)
    x[0, 156] = x[1, 3] = 50.0
    t = torch.tensor([156, 3], dtype=torch.uint8)
    if layout == "kdim":
        t = t.long()  # (torch takes uint8 targets for (N, C) input only)
    loss, stats = LAYOUTS[layout](x, t, z_loss=1e-2, return_stats=True)
    z_term = lambda x: 1e-2 * (torch.logsumexp(x, 1) ** 2).mean()  # noqa: E731
    assert_close_to_torch(stats.z_loss, z_term(x), float64_reference(z_term, x), "z_loss", tol=ASSERT_CLOSE)
    assert stats.accuracy.item() == 1.0
    value = torch.func.grad_and_value(lambda x: fused_loss.cross_entropy(x, t, z_loss=1e-2))(x)[1]
    torch.testing.assert_close(value, loss)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_ignored_row_of_minus_infinity_changes_nothing(layout):
    x = torch.randn(3, 5)
    x[1] = -math.inf
    t = torch.tensor([2, -100, 4])
    loss, stats = LAYOUTS[layout](x, t, z_loss=1e-2, return_stats=True)
    live, t_live = x[[0, 2]], t[[0, 2]]
    expected = torch_formula(live, t_live, z_loss=1e-2)
    reference = float64_reference(torch_formula, live, t_live, z_loss=1e-2)
    assert_close_to_torch(loss, expected, reference, "loss", tol=ASSERT_CLOSE)
    z_term = lambda z: torch_formula(z, t_live, z_loss=1e-2) - F.cross_entropy(z, t_live)  # noqa: E731
    assert_close_to_torch(stats.z_loss, z_term(live), float64_reference(z_term, live), "z_loss", tol=ASSERT_CLOSE)
    grad, value = torch.func.grad_and_value(lambda x: fused_loss.cross_entropy(x, t, z_loss=1e-2))(x)
    assert_close_to_torch(value, expected, reference, "value", tol=ASSERT_CLOSE)
    # torch's own log_softmax backward gives the ignored row NaN there; the other rows are exact
    torch_grad = torch.func.grad(lambda v: torch_formula(v, t_live, z_loss=1e-2))
    assert_close_to_torch(grad[[0, 2]], torch_grad(live), float64_reference(torch_grad, live), "grad", tol=ASSERT_CLOSE)
    xx = x.clone().requires_grad_()
    fused_loss.cross_entropy(xx, t, z_loss=1e-2).backward()  # the kernel: 0 for an ignored row
    assert torch.equal(xx.grad[1], torch.zeros(5))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lse_of_rows_of_infinities_and_nan_is_torchs(layout):
    x = torch.randn(4, 4)
    x[0, 1] = math.inf
    x[1] = -math.inf
    x[2, 3] = math.nan  # NaN, not -inf (a NaN block's max once lost the row's merge)
    _, stats = LAYOUTS[layout](x, torch.tensor([0, 1, 2, 3]), return_stats=True, reduction="none")
    # exact where not finite; the finite row by tests/helpers.py's rule (torch's rounding is its CPU kernel's)
    assert_close_to_torch(stats.lse, torch.logsumexp(x, 1), float64_reference(torch.logsumexp, x, 1), "lse",
                          tol=dict(atol=0, rtol=0))


def test_16_bit_layouts_agree_with_options():
    """The composed layouts shape 16-bit logits in float32, as the kernel does."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(16, 40, generator=g) * 20).to(torch.float16)
    t = torch.randint(0, 40, (16,), generator=g)
    kw = dict(temperature=0.1, softcap=30.0, z_loss=1e-3)
    rows = fused_loss.cross_entropy(x, t, **kw)
    kdim = fused_loss.cross_entropy(x.unsqueeze(2), t.unsqueeze(1), **kw)
    probs = fused_loss.cross_entropy(x, F.one_hot(t, 40).to(x.dtype), **kw)
    exact = torch_formula(x.double(), t, **kw).to(x.dtype)
    assert rows.dtype == kdim.dtype == probs.dtype == torch.float16
    assert rows == exact and kdim == exact and probs == exact


def test_stats_of_probability_targets_work_under_torch_func():
    x, t = torch.randn(4, 6), torch.softmax(torch.randn(4, 6), 1)
    grad, (loss, stats) = torch.func.grad(
        lambda x: (lambda out: (out[0], out))(fused_loss.cross_entropy(x, t, return_stats=True)), has_aux=True)(x)
    torch.testing.assert_close(stats.correct, x.argmax(1) == t.argmax(1))
    torch_grad = torch.func.grad(F.cross_entropy)
    assert_close_to_torch(grad, torch_grad(x, t), float64_reference(torch_grad, x, t), "grad", tol=ASSERT_CLOSE)
