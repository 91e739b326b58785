"""The gradient written during the forward (one read of the logits, one write of the
gradient): torch's values, and torch's autograd semantics when a graph is used more than
once or its gradient is kept."""
import pytest
import torch
import torch.nn.functional as F

import fused_loss
from fused_loss import reference
from helpers import (assert_close_to_torch, check_kept_gradient_survives_the_next_step,
                     check_retained_graph_and_repeated_grad_calls)

OPTIONS = [dict(), dict(label_smoothing=0.1), dict(weight=True), dict(weight=True, label_smoothing=0.2, ignore_index=1),
           dict(ignore_index=0)]


def _case(rows, classes, dtype, opts, seed=0, spatial=()):
    """(rows, classes) logits, or (rows, classes, *spatial) with a target per position."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, *spatial, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, classes, (rows, *spatial), generator=g)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    if "ignore_index" in kw:
        t.view(-1)[::3] = kw["ignore_index"]
    return x, t, kw


def _grad(fn, x, t, kw, reduction):
    x = x.clone().requires_grad_()
    fn(x, t, reduction=reduction, **kw).backward()  # upstream gradient exactly 1
    return x.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(64, 1000), (3, 70001), (40, 33000), (1, 1), (9, 7)], ids=str)
def test_backward_of_one_matches_torch(shape, opts, reduction):
    _check(*shape, torch.float32, opts, reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_backward_of_one_in_other_dtypes(dtype):
    _check(64, 1000, dtype, dict(label_smoothing=0.1, weight=True), "mean")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", OPTIONS + [dict(z_loss=1e-3)], ids=str)
@pytest.mark.parametrize("shape", [(4, 21, (7, 5)), (2, 300, (33,)), (3, 5, (1,)), (1, 2, (2, 2, 2))], ids=str)
def test_k_dim_backward_of_one_matches_torch(shape, opts, reduction):
    """(N, C, d...) input: the column path writes its gradient in the forward too (tiles of
    vector lanes, a partial last tile)."""
    if "z_loss" in opts:
        x, t, _ = _case(shape[0], shape[1], torch.float32, {}, spatial=shape[2])
        xx = x.clone().requires_grad_()
        fused_loss.cross_entropy(xx, t, reduction=reduction, z_loss=1e-3).backward()
        xr = x.double().requires_grad_()
        (F.cross_entropy(xr, t, reduction=reduction)
         + reference.reduce_terms(1e-3 * torch.logsumexp(xr, 1) ** 2, reduction, t.numel())).backward()
        torch.testing.assert_close(xx.grad, xr.grad.float())
        return
    _check(shape[0], shape[1], torch.float32, opts, reduction, spatial=shape[2])


def _check(rows, classes, dtype, opts, reduction, spatial=()):
    """tests/helpers.py's rule: torch's tolerance in float32/64, and for 16-bit types an error
    against float64 at most twice torch's own."""
    x, t, kw = _case(rows, classes, dtype, opts, spatial=spatial)
    ours, theirs = _grad(fused_loss.cross_entropy, x, t, kw, reduction), _grad(F.cross_entropy, x, t, kw, reduction)
    ref = _grad(F.cross_entropy, x.double(), t, {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()},
                reduction)
    assert_close_to_torch(ours, theirs, ref, "gradient")


def test_the_forward_writes_the_gradient_only_when_it_is_needed():
    x, t = torch.randn(16, 50), torch.randint(0, 50, (16,))
    ops = torch.ops.fused_loss
    assert ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, True)[2].shape == x.shape
    assert ops.cross_entropy_forward(x, t, None, 0, -100, 0.0, True)[2].numel() == 0  # 'none' recomputes
    assert ops.cross_entropy_forward(x.view(4, 50, 4), t.view(4, 4), None, 1, -100, 0.0, True)[2].shape == (4, 50, 4)
    assert ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, False)[2].numel() == 0
    # the public function asks for it only when the input needs a gradient
    loss = fused_loss.cross_entropy(x, t)
    assert loss.grad_fn is None
    with torch.no_grad():
        assert fused_loss.cross_entropy(x.requires_grad_(), t).grad_fn is None


def test_retained_graph_and_repeated_grad_calls():
    x, t, kw = _case(32, 500, torch.float32, dict(label_smoothing=0.1))
    expected = _grad(F.cross_entropy, x, t, kw, "mean")
    check_retained_graph_and_repeated_grad_calls(lambda xx: fused_loss.cross_entropy(xx, t, **kw), x, expected)


def test_two_losses_on_the_same_logits_and_scaled_losses():
    x, t, kw = _case(32, 500, torch.float32, dict(weight=True))
    for combine in [lambda f, x: f(x, t, **kw) + f(x, t, reduction="sum", **kw),
                    lambda f, x: 0.5 * f(x, t, **kw),
                    lambda f, x: f(x, t, **kw) * f(x.detach(), t, **kw)]:
        grads = []
        for f in (fused_loss.cross_entropy, F.cross_entropy):
            xx = x.clone().requires_grad_()
            combine(f, xx).backward()
            grads.append(xx.grad)
        torch.testing.assert_close(grads[0], grads[1])


def test_gradient_accumulates_over_steps():
    x, t, kw = _case(32, 500, torch.float32, {})
    xx = x.clone().requires_grad_()
    for _ in range(3):
        fused_loss.cross_entropy(xx, t).backward()
    torch.testing.assert_close(xx.grad, 3 * _grad(F.cross_entropy, x, t, kw, "mean"))


def test_a_kept_gradient_is_not_overwritten_by_the_next_forward():
    x, t, _ = _case(64, 20000, torch.float32, {})  # 5 MB: the gradient comes from the buffer cache
    check_kept_gradient_survives_the_next_step(fused_loss.cross_entropy, x, t)


@pytest.mark.parametrize("threads", [1, 2])
def test_in_pass_bits_equal_the_backward_recomputation(threads):
    """Same bits from the in-pass path (many rows), its split form (few rows) and the backward
    op, for 1 and 2 threads."""
    x, t, kw = _case(64, 3000, torch.float32, dict(label_smoothing=0.1, weight=True))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops = torch.ops.fused_loss
        _, stats, in_pass = ops.cross_entropy_forward(x, t, kw["weight"], 1, -100, 0.1, True)
        recomputed = ops.cross_entropy_backward(torch.ones(()), x, t, kw["weight"], stats, 1, -100, 0.1)
        assert torch.equal(in_pass, recomputed)
        _, _, few = ops.cross_entropy_forward(x[:3], t[:3], kw["weight"], 2, -100, 0.1, True)
        _, _, many = ops.cross_entropy_forward(x, t, kw["weight"], 2, -100, 0.1, True)
        assert torch.equal(few, many[:3])
        xk, tk = x.view(8, 8, 3000).transpose(1, 2).contiguous(), t[:64].view(8, 8)  # (N, C, d)
        _, stats, in_pass = ops.cross_entropy_forward(xk, tk, kw["weight"], 1, -100, 0.1, True)
        recomputed = ops.cross_entropy_backward(torch.ones(()), xk, tk, kw["weight"], stats, 1, -100, 0.1)
        assert torch.equal(in_pass, recomputed)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("upstream", [1.0, 0.5, -3.0])
def test_backward_into_keeps_the_buffer_only_for_an_upstream_of_one(upstream):
    """cross_entropy_backward_into (the CUDA backward's device-side form of "the upstream gradient
    is exactly 1"; also registered on the CPU): the forward's buffer is kept for 1, else it gets
    the backward op's bits. Its errors name fused_loss."""
    x, t, kw = _case(16, 300, torch.float32, dict(label_smoothing=0.1, weight=True, ignore_index=2))
    ops = torch.ops.fused_loss
    _, stats, buffer = ops.cross_entropy_forward(x, t, kw["weight"], 1, 2, 0.1, True, 5.0, 1.0, 1e-3)
    g = torch.tensor(upstream)
    want = ops.cross_entropy_backward(g, x, t, kw["weight"], stats, 1, 2, 0.1, 5.0, 1.0, 1e-3)
    assert torch.equal(buffer, want) == (upstream == 1.0)
    buffer.fill_(7.0)  # a sentinel: kept for an upstream of 1, overwritten otherwise
    ops.cross_entropy_backward_into(buffer, g, x, t, kw["weight"], stats, 1, 2, 0.1, 5.0, 1.0, 1e-3)
    assert torch.equal(buffer, torch.full_like(buffer, 7.0) if upstream == 1.0 else want)
    with pytest.raises(RuntimeError, match="fused_loss.cross_entropy backward_into"):
        ops.cross_entropy_backward_into(buffer[:, :5], g, x, t, kw["weight"], stats, 1, 2, 0.1)
    with pytest.raises(RuntimeError, match="fused_loss.cross_entropy backward_into"):
        ops.cross_entropy_backward_into(buffer, g, x, t, kw["weight"], stats, 0, 2, 0.1)


@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_probability_targets_backward_into(upstream):
    """cross_entropy_prob_backward_into, as cross_entropy_backward_into (also on the CPU)."""
    x, t = _prob_case(12, 400)
    w = torch.rand(400, dtype=torch.float32) + 0.5
    ops = torch.ops.fused_loss
    _, stats, buffer = ops.cross_entropy_prob_forward(x, t, w, 1, 0.1, True)
    g = torch.tensor(upstream)
    want = ops.cross_entropy_prob_backward(g, x, t, w, stats, 1, 0.1, True, False)[0]
    assert torch.equal(buffer, want) == (upstream == 1.0)
    buffer.fill_(7.0)  # a sentinel: kept for an upstream of 1, overwritten otherwise
    ops.cross_entropy_prob_backward_into(buffer, g, x, t, w, stats, 1, 0.1)
    assert torch.equal(buffer, torch.full_like(buffer, 7.0) if upstream == 1.0 else want)
    with pytest.raises(RuntimeError, match="fused_loss.cross_entropy backward_into"):
        ops.cross_entropy_prob_backward_into(buffer, g, x, t, w, stats, 0, 0.1)


def _prob_case(rows, classes, spatial=(), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, *spatial, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.softmax(torch.randn(rows, classes, *spatial, generator=g, dtype=torch.float64) * 2, 1).to(dtype)
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1), dict(weight=True, label_smoothing=0.2)], ids=str)
@pytest.mark.parametrize("shape", [(64, 1000, ()), (3, 70001, ()), (40, 33000, ()), (1, 1, ()), (4, 21, (7, 5)),
                                   (2, 300, (33,))], ids=str)
def test_probability_targets_backward_of_one_matches_torch(shape, opts, reduction):
    rows, classes, spatial = shape
    x, t = _prob_case(rows, classes, spatial)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(classes, dtype=torch.float64) + 0.1
    grads = []
    for f, dt in [(fused_loss.cross_entropy, torch.float32), (F.cross_entropy, torch.float32),
                  (F.cross_entropy, torch.float64)]:
        xx = x.to(dt).clone().requires_grad_()
        kk = {k: (v.to(dt) if torch.is_tensor(v) else v) for k, v in kw.items()}
        f(xx, t.to(dt), reduction=reduction, **kk).backward()
        grads.append(xx.grad)
    assert_close_to_torch(grads[0], grads[1], grads[2], "gradient")


@pytest.mark.parametrize("threads", [1, 2])
def test_probability_targets_in_pass_bits_equal_the_backward_recomputation(threads):
    x, t = _prob_case(64, 3000)
    w = torch.rand(3000) + 0.1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops = torch.ops.fused_loss
        for xx, tt in [(x, t), (x[:3], t[:3]), (x.view(8, 8, 3000).transpose(1, 2).contiguous(),
                                                 t.view(8, 8, 3000).transpose(1, 2).contiguous())]:
            _, stats, in_pass = ops.cross_entropy_prob_forward(xx, tt, w, 1, 0.1, True)
            recomputed, _ = ops.cross_entropy_prob_backward(torch.ones(()), xx, tt, w, stats, 1, 0.1, True, False)
            both = ops.cross_entropy_prob_backward(torch.ones(()), xx, tt, w, stats, 1, 0.1, True, True)
            target_only = ops.cross_entropy_prob_backward(torch.ones(()), xx, tt, w, stats, 1, 0.1, False, True)
            assert torch.equal(in_pass, recomputed) and torch.equal(in_pass, both[0])
            assert torch.equal(both[1], target_only[1])
        _, _, few = ops.cross_entropy_prob_forward(x[:3], t[:3], w, 2, 0.1, True)
        _, _, many = ops.cross_entropy_prob_forward(x, t, w, 2, 0.1, True)
        assert torch.equal(few, many[:3])
    finally:
        torch.set_num_threads(before)


def test_probability_targets_autograd_semantics():
    """The in-pass gradient of the input beside the target's (computed by the backward), a
    retained graph, scaled losses, and a kept gradient that the next forward must not touch."""
    x, t = _prob_case(32, 500)
    tt = t.clone().requires_grad_()
    xx, xr, tr = x.clone().requires_grad_(), x.clone().requires_grad_(), t.clone().requires_grad_()
    fused_loss.cross_entropy(xx, tt, label_smoothing=0.1).backward()
    F.cross_entropy(xr, tr, label_smoothing=0.1).backward()
    torch.testing.assert_close(xx.grad, xr.grad)
    torch.testing.assert_close(tt.grad, tr.grad)
    expected = _grad(F.cross_entropy, x, t, {}, "mean")
    check_retained_graph_and_repeated_grad_calls(lambda v: fused_loss.cross_entropy(v, t), x, expected)
    for scale in (0.5, 3.0):
        xs = x.clone().requires_grad_()
        (scale * fused_loss.cross_entropy(xs, t)).backward()
        torch.testing.assert_close(xs.grad, scale * expected)
    xb, tb = _prob_case(64, 20000)
    check_kept_gradient_survives_the_next_step(fused_loss.cross_entropy, xb, tb)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, weight=True, ignore_index=1),
                                  dict(softcap=20.0, temperature=0.7, z_loss=1e-3, return_stats=True)], ids=str)
def test_gradient_in_place_equals_the_forward_gradient(opts, dtype, threads):
    """cross_entropy_forward_grad_in_place (linear cross-entropy's chunks): the logits become
    the forward's gradient, bit for bit, with the same loss and stats, on the one-pass path
    (many rows) and the split path (few)."""
    opts = dict(opts)
    llm = {k: opts.pop(k) for k in ("softcap", "temperature", "z_loss", "return_stats") if k in opts}
    x, t, kw = _case(64, 3000, dtype, opts)
    args = (kw.get("weight"), 2, kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0))
    ops = torch.ops.fused_loss
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (64, 3):
            xr, tr = x[:rows].clone(), t[:rows]
            loss, stats, grad = ops.cross_entropy_forward(xr, tr, *args, True, **llm)
            loss2, stats2 = ops.cross_entropy_forward_grad_in_place(xr, tr, *args, **llm)
            # The in-place op's loss is in the accumulation dtype, not rounded to the logits' dtype.
            assert loss2.dtype == torch.float32
            assert torch.equal(xr, grad) and torch.equal(loss, loss2.to(dtype)) and torch.equal(stats, stats2)
            if dtype == torch.float32:
                assert torch.equal(loss, loss2)
            else:
                w32 = args[0].float() if args[0] is not None else None
                exact = ops.cross_entropy_forward(x[:rows].float(), tr, w32, *args[1:], False, **llm)[0]
                torch.testing.assert_close(loss2, exact, rtol=1e-5, atol=0)  # bf16 logits are exact in float32
    finally:
        torch.set_num_threads(before)


def test_gradient_in_place_checks_and_opcheck():
    x, t = torch.randn(6, 9), torch.randint(0, 9, (6,))
    ops = torch.ops.fused_loss
    for bad, red in [(x.t().contiguous().t(), 1), (x.clone(), 0), (x.view(6, 9, 1).clone(), 1)]:
        with pytest.raises(RuntimeError, match="fused_loss.cross_entropy_forward_grad_in_place"):
            ops.cross_entropy_forward_grad_in_place(bad, t if bad.dim() == 2 else t.view(6, 1), None, red, -100, 0.0)
    torch.library.opcheck(ops.cross_entropy_forward_grad_in_place, (x.clone(), t, None, 1, -100, 0.1),
                          dict(z_loss=1e-3, return_stats=True))
