"""fused_loss.linear_cross_entropy / LinearCrossEntropyLoss: values and the gradients of input,
linear_weight and linear_bias against the unfused formula (F.linear + F.cross_entropy, the LLM
options written in torch ops) and against torch's own F.linear_cross_entropy; the chunking
(N not divisible by the chunk, one row per chunk, one chunk); autograd semantics of the
gradients computed in the forward; opcheck, torch.compile, gradcheck; 16-bit accuracy; errors."""
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_loss
from fused_loss import chunked_linear_cross_entropy as lce
from fused_loss.reference import linear_cross_entropy_with_options as unfused
from helpers import assert_close_to_torch

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
V, H = 11, 5


def _inputs(shape=(13,), dtype=torch.float64, v=V, h=H, bias=True, ignore=(2,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, h, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 2).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, v, shape, generator=gen)
    for i in ignore:
        t.view(-1)[i] = -100
    return x, w, b, t


def _value_and_grads(fn, x, w, b, t, upstream=None, **kw):
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(),
              None if b is None else b.clone().requires_grad_()]
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2], **kw)
    diff = [p for p in leaves if p is not None]
    up = torch.ones_like(loss) if upstream is None else upstream(loss)
    grads = torch.autograd.grad(loss, diff, up)
    return loss.detach(), grads


def _float64_reference(fn, x, w, b, t, upstream=None, **kw):
    """fn's value and gradients on float64 copies of the same values (the same upstream values too),
    computed once when first asked for: tests/helpers.py's rule where torch's float32 is off."""
    up = None if upstream is None else (lambda loss: upstream(loss.to(x.dtype)).double())
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    return functools.cache(lambda: _value_and_grads(fn, x.double(), w.double(), None if b is None else b.double(),
                                                    t, up, **kw))


def _check(x, w, b, t, fused_kw, ref_kw=None, upstream=None, tol=None):
    ref_kw = fused_kw if ref_kw is None else ref_kw
    ours, g_ours = _value_and_grads(fused_loss.linear_cross_entropy, x, w, b, t, upstream, **fused_kw)
    theirs, g_theirs = _value_and_grads(unfused, x, w, b, t, upstream, **ref_kw)
    ref = _float64_reference(unfused, x, w, b, t, upstream, **ref_kw)
    tol = tol or TOL[x.dtype]
    assert_close_to_torch(ours, theirs, lambda: ref()[0], "loss", tol=tol)
    for i, (name, a, e) in enumerate(zip(("input", "linear_weight", "linear_bias"), g_ours, g_theirs)):
        assert_close_to_torch(a, e, lambda i=i: ref()[1][i], f"grad of {name}", tol=tol)


def _per_row(loss):
    gen = torch.Generator().manual_seed(5)
    return (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype)


CONFIGS = {
    "plain": dict(),
    "weights+smoothing": dict(weight="w", label_smoothing=0.2),
    "options": dict(softcap=3.0, temperature=0.7, z_loss=1e-2),
    "everything": dict(weight="w", label_smoothing=0.1, softcap=2.0, temperature=1.3, z_loss=1e-3),
}


def _kw(config, dtype, reduction, v=V):
    kw = dict(CONFIGS[config], reduction=reduction)
    if kw.get("weight") == "w":
        kw["weight"] = (torch.rand(v, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.2).to(dtype)
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_unfused(dtype, reduction, config):
    x, w, b, t = _inputs(dtype=dtype)
    kw = _kw(config, dtype, reduction)
    upstream = _per_row if reduction == "none" else (lambda loss: torch.full_like(loss, 0.75))
    for chunk in (1, 4, 13, 50, None):  # one row, N not divisible, exactly N, more than N, the default
        _check(x, w, b, t, dict(kw, chunk_size=chunk), kw, upstream)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_dimensions_and_no_bias(reduction):
    x, w, _, t = _inputs(shape=(3, 4, 2), ignore=(0, 7))
    kw = dict(weight=_kw("weights+smoothing", torch.float64, reduction)["weight"], label_smoothing=0.05,
              reduction=reduction, z_loss=1e-3)
    _check(x, w, None, t, dict(kw, chunk_size=5), kw, _per_row if reduction == "none" else None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unbatched_input(reduction):
    x, w, b, t = _inputs(shape=(), ignore=())
    kw = dict(reduction=reduction, label_smoothing=0.1)
    ours = fused_loss.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    torch.testing.assert_close(ours, F.linear_cross_entropy(x, w, t, linear_bias=b, **kw))
    # A target of shape (1,) means the same (torch's own fails with label smoothing there).
    torch.testing.assert_close(fused_loss.linear_cross_entropy(x, w, t.reshape(1), linear_bias=b, **kw), ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True])
def test_matches_torch_linear_cross_entropy(dtype, reduction, chunked):
    """torch's own F.linear_cross_entropy (its reference path, and its chunked path where it
    takes the arguments), with weights and ignore_index."""
    x, w, b, t = _inputs(shape=(37,), dtype=dtype, v=23, h=8, ignore=(0, 5, 6))
    weight = _kw("weights+smoothing", dtype, reduction, v=23)["weight"]
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8, chunking_method=None) if chunked else None
    kw = dict(weight=weight, reduction=reduction, ignore_index=-100)
    up = _per_row if reduction == "none" else None
    ours = _value_and_grads(fused_loss.linear_cross_entropy, x, w, b, t, up, options=options, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's chunked path warns about what it does not take
        theirs = _value_and_grads(F.linear_cross_entropy, x, w, b, t, up, options=options, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _float64_reference(F.linear_cross_entropy, x, w, b, t, up, options=options, **kw)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
        assert_close_to_torch(ours[0], theirs[0], lambda: ref()[0], "loss", tol=tol)
        for i, (a, e) in enumerate(zip(ours[1], theirs[1])):
            assert_close_to_torch(a, e, lambda i=i: ref()[1][i], f"gradient {i}", tol=tol)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(label_smoothing, weighted):
    """torch: NaN for 'mean' (0 / 0), 0 for 'sum', zero gradients."""
    x, w, b, t = _inputs(shape=(6,), ignore=range(6))
    weight = torch.rand(V, dtype=torch.float64) if weighted else None
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
        ours, g_ours = _value_and_grads(fused_loss.linear_cross_entropy, x, w, b, t, chunk_size=4, **kw)
        theirs, g_theirs = _value_and_grads(F.linear_cross_entropy, x, w, b, t, **kw)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        for a, e in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, e)
            assert not a.isnan().any()


def test_mean_uses_the_whole_batch_denominator():
    """Chunks with very different weight sums: a per-chunk mean would be wrong."""
    x, w, b, t = _inputs(shape=(12,), ignore=(0, 1, 2, 3, 4, 8))
    weight = torch.linspace(0.1, 3.0, V, dtype=torch.float64)
    kw = dict(weight=weight, label_smoothing=0.2, z_loss=1e-2)
    _check(x, w, b, t, dict(kw, chunk_size=4), kw)


def test_empty_batch():
    x, w, b, t = _inputs(shape=(0,), ignore=())
    for reduction in ("mean", "sum", "none"):
        ours, g_ours = _value_and_grads(fused_loss.linear_cross_entropy, x, w, b, t, reduction=reduction)
        theirs, g_theirs = _value_and_grads(F.linear_cross_entropy, x, w, b, t, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        for a, e in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, e)


def test_gradcheck():
    x, w, b, t = _inputs(shape=(5,), v=6, h=3, ignore=(1,))
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    for reduction in ("mean", "sum", "none"):
        def fn(x, w, b):
            return fused_loss.linear_cross_entropy(x, w, t, linear_bias=b, weight=weight, reduction=reduction,
                                                   label_smoothing=0.1, softcap=2.5, z_loss=0.01, chunk_size=2)
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_gradgradcheck_uses_the_unfused_formula():
    x, w, b, t = _inputs(shape=(4,), v=5, h=3, ignore=())

    def fn(x, w, b):
        return fused_loss.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1, chunk_size=3)
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def _expected_grads(x, w, b, t, scale=1.0, **kw):
    _, grads = _value_and_grads(unfused, x, w, b, t, **kw)
    return [g * scale for g in grads]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_repeated_and_scaled_backward(reduction):
    """The forward's gradients are handed out once (scaled in place for an upstream gradient
    other than 1); every later backward recomputes, even after the user writes into an earlier
    result; .grad accumulates."""
    x, w, b, t = _inputs(shape=(9,))
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    xx, ww, bb = (p.clone().requires_grad_() for p in (x, w, b))

    def make_loss():
        loss = fused_loss.linear_cross_entropy(xx, ww, t, linear_bias=bb, chunk_size=4, **kw)
        return loss.sum() if reduction == "none" else loss
    expected = _expected_grads(x, w, b, t, **kw) if reduction == "mean" else \
        _expected_grads(x, w, b, t, upstream=torch.ones_like, **kw)
    loss = make_loss()
    g1 = torch.autograd.grad(loss, (xx, ww, bb), retain_graph=True)
    for a, e in zip(g1, expected):
        torch.testing.assert_close(a, e)
    for g in g1:
        g.mul_(100)  # scribbling on the first result changes nothing after
    g2 = torch.autograd.grad(loss, (xx, ww), retain_graph=True)  # a subset, asked for separately
    for a, e in zip(g2, expected):
        torch.testing.assert_close(a, e)
    loss.backward(retain_graph=True)
    loss.backward()
    for p, e in zip((xx, ww, bb), expected):
        torch.testing.assert_close(p.grad, 2 * e)
    # A scaled loss (loss scaling, gradient accumulation): the first backward scales in place.
    for p in (xx, ww, bb):
        p.grad = None
    (make_loss() * 3.0).backward()
    for p, e in zip((xx, ww, bb), expected):
        torch.testing.assert_close(p.grad, 3 * e)
    # The first backward hands out the forward's buffers: x.grad is that buffer, and the next
    # step's forward does not write into a gradient kept from this one.
    kept = [p.grad for p in (xx, ww, bb)]
    before = [k.clone() for k in kept]
    for p in (xx, ww, bb):
        p.grad = None
    make_loss().backward()
    for k, c in zip(kept, before):
        assert torch.equal(k, c)


def test_only_the_gradients_needed_are_computed():
    x, w, b, t = _inputs()
    op = torch.ops.fused_loss.linear_cross_entropy_forward
    args = (x, w, t, b, None, 1, -100, 0.0, None, 1.0, 0.0, 4)
    _, _, dx, dw, db = op(*args, False, True, False, False)
    assert dx.numel() == 0 and dw.shape == w.shape and db.numel() == 0
    # The public function asks only for what requires grad, in grad mode.
    xx = x.clone().requires_grad_()
    loss = fused_loss.linear_cross_entropy(xx, w, t, linear_bias=b)
    (gx,) = torch.autograd.grad(loss, xx)
    torch.testing.assert_close(gx, _expected_grads(x, w, b, t)[0])
    with torch.no_grad():
        loss = fused_loss.linear_cross_entropy(xx, w.requires_grad_(), t, linear_bias=b)
    assert not loss.requires_grad


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x, w, b, t = _inputs(shape=(7,), dtype=torch.float32)
    fwd, bwd = torch.ops.fused_loss.linear_cross_entropy_forward, torch.ops.fused_loss.linear_cross_entropy_backward
    weight = torch.rand(V)
    for red, bias, weights, opts, rs in [(1, b, None, (None, 1.0, 0.0), False),
                                         (2, None, weight, (3.0, 0.5, 1e-2), True),
                                         (0, b, weight, (None, 1.0, 1e-3), False),
                                         (0, None, None, (2.0, 1.0, 0.0), True)]:
        xx, ww = x.clone().requires_grad_(requires_grad), w.clone().requires_grad_(requires_grad)
        bb = None if bias is None else bias.clone().requires_grad_(requires_grad)
        flags = (requires_grad, requires_grad, requires_grad and bias is not None)
        args = (xx, ww, t, bb, weights, red, -100, 0.1, *opts, 3, *flags, rs)
        torch.library.opcheck(fwd, args)
        loss, stats, *_ = fwd(*args)
        grad = torch.rand_like(loss)
        torch.library.opcheck(bwd, (grad, x, w, t, bias, weights, stats if red == 0 else stats.new_empty((0,)), red,
                                    -100, 0.1, *opts, 3, True, True, bias is not None))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    torch._dynamo.reset()
    x, w, b, t = _inputs(shape=(2, 5), dtype=torch.float32)
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=5.0, z_loss=1e-3, chunk_size=4)

    def step(x, w, b):
        loss = fused_loss.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
        return loss.sum() * 2 if reduction == "none" else loss * 2  # an upstream gradient other than 1
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled, compiled):  # the compiled backward runs twice: no state kept in it
        leaves = [p.clone().requires_grad_() for p in (x, w, b)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *[p.grad for p in leaves]))
    for got in results[1:]:
        for a, e in zip(got, results[0]):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_no_worse_than_unfused(dtype):
    """Relative errors against float64 no larger than those of the unfused computation in the same
    dtype (within 1.5x: ours measure 0.3-1.0x). The weight's gradient is accumulated over the 128
    chunks in float32: accumulated in the input's dtype, its error is 3x the unfused one's."""
    x, w, b, t = _inputs(shape=(1024,), v=96, h=64, ignore=(3, 9))
    ref = _value_and_grads(unfused, x, w, b, t)
    torch_ = _value_and_grads(unfused, *(p.to(dtype) for p in (x, w, b)), t)
    for chunk in (8, None):  # 128 chunks; one chunk (no float32 accumulator needed)
        ours = _value_and_grads(fused_loss.linear_cross_entropy, *(p.to(dtype) for p in (x, w, b)), t,
                                chunk_size=chunk)
        assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1])
        for name, a, e, r in zip(("loss", "input", "linear_weight", "linear_bias"), (ours[0], *ours[1]),
                                 (torch_[0], *torch_[1]), (ref[0], *ref[1])):
            err_ours = (a.double() - r).norm() / r.norm()
            err_torch = (e.double() - r).norm() / r.norm()
            assert err_ours <= 1.5 * err_torch + torch.finfo(dtype).eps / 64, (chunk, name, err_ours.item(),
                                                                               err_torch.item())


def test_return_stats_match_cross_entropy():
    x, w, b, t = _inputs(shape=(3, 4), dtype=torch.float32, ignore=(5,))
    kw = dict(label_smoothing=0.1, softcap=4.0, z_loss=1e-2, return_stats=True)
    for reduction in ("mean", "none"):
        loss, stats = fused_loss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=5, **kw)
        logits = F.linear(x, w, b).reshape(-1, V)
        ref_loss, ref = fused_loss.cross_entropy(logits, t.reshape(-1), reduction=reduction, **kw)
        torch.testing.assert_close(loss, ref_loss.reshape(loss.shape))
        assert stats.lse.shape == t.shape and stats.correct.dtype == torch.bool
        for name in stats._fields:
            torch.testing.assert_close(getattr(stats, name).reshape(-1) if name != "accuracy" else stats.accuracy,
                                       getattr(ref, name).reshape(-1) if name != "accuracy" else ref.accuracy,
                                       msg=name)


def test_unfused_fallbacks_probabilities_and_k_dim():
    x, w, b, _ = _inputs(shape=(6,))
    prob = torch.softmax(torch.randn(6, V, dtype=torch.float64), 1)
    for reduction in ("mean", "none"):
        kw = dict(linear_bias=b, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(fused_loss.linear_cross_entropy(x, w, prob, **kw),
                                   F.linear_cross_entropy(x, w, prob, **kw))
    wk, bk = torch.randn(V, 2, 3, H, dtype=torch.float64), torch.randn(V, 2, dtype=torch.float64)
    tk = torch.randint(0, V, (6, 2))
    torch.testing.assert_close(fused_loss.linear_cross_entropy(x, wk[:, :, 0], tk, linear_bias=bk),
                               F.linear_cross_entropy(x, wk[:, :, 0], tk, linear_bias=bk))
    # probabilities with more leading dimensions (beyond torch): rows of (N, V)
    x3, prob3 = x.reshape(2, 3, H), prob.reshape(2, 3, V)
    torch.testing.assert_close(fused_loss.linear_cross_entropy(x3, w, prob3, reduction="none"),
                               F.cross_entropy(F.linear(x, w), prob, reduction="none").reshape(2, 3))


def _error(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


def test_errors_match_torch():
    x, w, b, t = _inputs(shape=(4,), dtype=torch.float32, ignore=())
    bad = [
        ((torch.tensor(1.0), w, t), {}),
        ((x, w[0], t), {}),
        ((x, w[:, :3], t), {}),
        ((x, w, t), dict(linear_bias=torch.zeros(V + 1))),
        ((x, w, t[:3]), {}),
        ((x, w, t.reshape(2, 2)), {}),
        ((x, w, torch.full((4,), V)), {}),
        ((x, w, t.int()), {}),
        ((x, w, t), dict(weight=torch.rand(V + 2))),
        ((x, w, t), dict(reduction="avg")),
        ((x, w, t), dict(label_smoothing=1.5)),
        ((x, w.double(), t), {}),
        ((x, w, torch.softmax(torch.randn(4, V), 1)), dict(ignore_index=-100)),
        ((x[0], w.reshape(V, 1, H), t[:1]), {}),
    ]
    for args, kw in bad:
        ours, theirs = _error(fused_loss.linear_cross_entropy, *args, **kw), _error(F.linear_cross_entropy, *args, **kw)
        assert theirs is not None and ours is not None, (kw, ours, theirs)
        assert ours[0] is theirs[0], (ours, theirs)
        if "out of bounds" in theirs[1]:  # ours also names the valid range
            assert ours[1].startswith(theirs[1][:-1]), (ours, theirs)
        else:
            assert ours[1] == theirs[1], (ours, theirs)


def test_our_errors():
    x, w, b, t = _inputs(shape=(4,), ignore=())
    for kw, match in [(dict(chunk_size=0), "chunk_size"), (dict(softcap=-1.0), "softcap"),
                      (dict(temperature=0.0), "temperature"), (dict(z_loss=-1.0), "z_loss")]:
        with pytest.raises(ValueError, match=f"fused_loss.linear_cross_entropy: {match}"):
            fused_loss.linear_cross_entropy(x, w, t, **kw)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        fused_loss.linear_cross_entropy(x, w, t, weight=torch.rand(V, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="expected a class-index target of shape"):
        fused_loss.linear_cross_entropy(x.reshape(2, 2, H), w, t)


def test_default_chunk_size():
    f32 = torch.float32
    assert lce.default_chunk_size(8192, 2048, 32000, f32, torch.device("cpu")) == 512  # 64 MiB of logits
    assert lce.default_chunk_size(100, 64, 1000, f32, torch.device("cpu")) == 100  # one chunk
    assert lce.default_chunk_size(1000, 64, 8000, torch.bfloat16, torch.device("cpu")) == 1000  # 16 MB: one chunk
    assert lce.default_chunk_size(3000, 64, 32000, f32, torch.device("cpu")) == 504  # 6 chunks, balanced to a multiple of 8
    assert lce.default_chunk_size(1000, 64, 128256, torch.bfloat16, torch.device("cpu")) == 504  # 2 chunks of the minimum
    assert lce.default_chunk_size(1100, 64, 128256, torch.bfloat16, torch.device("cpu")) == 368  # 3 chunks, balanced
    assert lce.default_chunk_size(8192, 4096, 128256, f32, torch.device("cpu")) == lce.MIN_CHUNK_ROWS  # 256 MiB
    assert lce.default_chunk_size(0, 8, 8, f32, torch.device("cpu")) == 1


def test_module_matches_torch_module():
    torch.manual_seed(1)
    kw = dict(bias=True, reduction="sum", ignore_index=3, label_smoothing=0.1, dtype=torch.float64)
    ours, theirs = fused_loss.LinearCrossEntropyLoss(H, V, chunk_size=3, **kw), torch.nn.LinearCrossEntropyLoss(H, V, **kw)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x, _, _, t = _inputs(shape=(7,), ignore=())
    a, b = ours(x, t), theirs(x, t)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError):
        fused_loss.LinearCrossEntropyLoss(H, V, reduction="avg")
    loss, stats = fused_loss.LinearCrossEntropyLoss(H, V, return_stats=True, dtype=torch.float64)(x, t)
    assert stats.lse.shape == t.shape


@pytest.mark.parametrize("chunk_size", [None, 1024, 4096])
def test_float16_mean_weight_grad_does_not_overflow(chunk_size):
    # The unscaled ('sum') weight gradient of 4096 rows of |x| = 40 sharing a class exceeds
    # float16's range; torch scales the logit gradient first and gets -80/3 per element.
    n, h, v = 4096, 4, 3
    x = torch.full((n, h), 40.0, dtype=torch.float16)
    t = torch.zeros(n, dtype=torch.long)
    grads = []
    for fn in (fused_loss.linear_cross_entropy, F.linear_cross_entropy):
        w = torch.zeros(v, h, dtype=torch.float16, requires_grad=True)
        kw = dict(chunk_size=chunk_size) if fn is fused_loss.linear_cross_entropy else {}
        fn(x, w, t, **kw).backward()
        grads.append(w.grad)
    assert grads[0].isfinite().all()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(4,), (2, 3), ()])
def test_zero_in_features(reduction, shape):
    # in_features = 0: the logits are the bias (or 0); torch computes it, reshape(-1, 0) cannot.
    x = torch.zeros(*shape, 0, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(V, 0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, shape)
    loss = fused_loss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    expected = F.cross_entropy(F.linear(x.detach(), w.detach(), b.detach()).reshape(-1, V), t.reshape(-1),
                               reduction=reduction)
    torch.testing.assert_close(loss, expected.reshape(loss.shape))
    loss.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    b_ref = b.detach().clone().requires_grad_()
    F.cross_entropy(b_ref.expand(max(1, math.prod(shape)), V), t.reshape(-1), reduction=reduction).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad)


def test_multi_target_error_is_torch_runtime_error():
    # torch's kernel raises RuntimeError for an (N, 1) class-index target; the meta
    # decomposition asked for the message asserts (AssertionError) instead.
    x, w, b, t = _inputs()
    with pytest.raises(RuntimeError, match="0D or 1D target tensor expected"):
        F.linear_cross_entropy(x, w, t.reshape(-1, 1))
    with pytest.raises(RuntimeError, match="0D or 1D target tensor expected"):
        fused_loss.linear_cross_entropy(x, w, t.reshape(-1, 1))


@pytest.mark.parametrize("case", ["all ignored", "zero weights", "zero weights, smoothing"])
def test_zero_denominator_gives_torchs_nan_and_zero_gradients(case):
    """A 'mean' denominator of 0 is torch's 0/0: NaN loss; NaN gradients for the rows not
    ignored (also where label smoothing adds a finite part), 0 for the ignored ones; the
    weight's gradient 0 when every row is ignored."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.full((4,), -100) if case == "all ignored" else torch.tensor([0, 1, -100, 1])
    kw = {} if case == "all ignored" else dict(weight=torch.tensor([0., 0., 1., 1., 1.], dtype=torch.float64))
    if case.endswith("smoothing"):
        kw["label_smoothing"] = 0.2
    results = []
    for f in (fused_loss.linear_cross_entropy, F.linear_cross_entropy):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(xx, ww, t, chunk_size=2, **kw) if f is fused_loss.linear_cross_entropy else f(xx, ww, t, **kw)
        loss.backward()
        results.append((loss, xx.grad, ww.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("smoothing", [-0.1, float("nan")])
def test_negative_or_nan_label_smoothing_is_none_as_in_torch(smoothing):
    g = torch.Generator().manual_seed(0)
    x, w, t = torch.randn(6, 3, generator=g), torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(fused_loss.linear_cross_entropy(x, w, t, label_smoothing=smoothing),
                               F.linear_cross_entropy(x, w, t, label_smoothing=smoothing))


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13 has no F.linear_cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autocast_as_torch(reduction):
    # Under autocast torch's product runs in bfloat16 and its cross-entropy in float32; the loss is
    # float32. Mean and sum are not rounded to bfloat16 on the way (chunk sums included: chunk_size=7);
    # 'none' rows are (the kernel's per-row output is in the logits' dtype).
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (50,), generator=g)
    y[3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear_cross_entropy(h, w, y, reduction=reduction, label_smoothing=0.1)
        got = fused_loss.linear_cross_entropy(h, w, y, reduction=reduction, label_smoothing=0.1, chunk_size=7)
        with pytest.raises(RuntimeError, match="same dtype"):  # outside autocast, mixed dtypes are refused
            with torch.autocast("cpu", enabled=False):
                fused_loss.linear_cross_entropy(h.bfloat16(), w, y)
    assert got.dtype == want.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if reduction != "none" else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    # Gradients: bfloat16 products round differently; against float64 on the same bfloat16
    # operands, the error is at most about twice torch's.
    up = torch.rand_like(want)
    h64, w64 = (t.detach().bfloat16().double().requires_grad_() for t in (h, w))
    exact = torch.autograd.grad(F.cross_entropy(h64 @ w64.T, y, reduction=reduction, label_smoothing=0.1),
                                (h64, w64), up.double())
    for a, b, e in zip(torch.autograd.grad(got, (h, w), up), torch.autograd.grad(want, (h, w), up), exact):
        assert a.dtype == b.dtype == torch.float32
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, softcap=3.0, temperature=0.8, z_loss=1e-3,
                                               weighted=True)], ids=["plain", "options"])
def test_chunks_on_a_device_without_the_kernel(monkeypatch, reduction, dtype, opts):
    """Where the build has no cross-entropy kernel (CUDA, for now) the chunks take torch ops
    (composed_cross_entropy): forced here on the CPU, they give the kernel path's results."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 40, (50,), generator=g)
    y[3] = -100
    kw = {k: v for k, v in opts.items() if k != "weighted"}
    if opts.get("weighted"):
        kw["weight"] = torch.rand(40, generator=g, dtype=torch.float64).to(dtype)

    def run():
        x, lw = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fused_loss.linear_cross_entropy(x, lw, y, reduction=reduction, chunk_size=7, **kw)
        up = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        return [out.detach(), *torch.autograd.grad(out, (x, lw), up)]

    want = run()
    monkeypatch.setattr(lce, "chunk_ops", lambda device: lce._ComposedChunkOps)
    got = run()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    with pytest.raises(NotImplementedError, match="fused_loss.linear_cross_entropy: return_stats"):
        fused_loss.linear_cross_entropy(h, w, y, return_stats=True, chunk_size=7)
