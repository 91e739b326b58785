"""Precision at large logits: the float32 loss and gradient errors against float64 stay
within about twice torch's own, whatever the logits' common offset (the row max is kept
apart from the log of the sum, never one absolute log-sum-exp)."""
import pytest
import torch
import torch.nn.functional as F

import fused_loss


def _case(path, offset):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 1000, dtype=torch.float64, generator=gen) + offset).float()
    t = torch.randint(0, 1000, (64,), generator=gen)
    kw = {}
    if path == "kdim":
        x, t = x.view(8, 8, 1000).transpose(1, 2).contiguous(), t.view(8, 8)
    elif path == "prob":
        t = torch.softmax(torch.randn(64, 1000, generator=gen), 1)
    elif path == "smooth_weight":
        kw = dict(label_smoothing=0.1, weight=torch.rand(1000, generator=gen) + 0.5)
    elif path == "prob_smooth_kdim":
        x = x.view(8, 8, 1000).transpose(1, 2).contiguous()
        t = torch.softmax(torch.randn(8, 1000, 8, generator=gen), 1)
        kw = dict(label_smoothing=0.2)
    return x, t, kw


def _errors(fn, x, t, kw, ref_loss, ref_grad):
    x = x.clone().requires_grad_()
    loss = fn(x, t, reduction="sum", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    loss_err = abs(loss.double().item() - ref_loss) / abs(ref_loss)
    grad_err = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    return loss_err, grad_err


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("path", ["row", "kdim", "prob", "smooth_weight", "prob_smooth_kdim"])
def test_float32_error_does_not_grow_with_the_logit_offset(path, offset):
    x, t, kw = _case(path, offset)
    x64 = x.double().requires_grad_()
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = F.cross_entropy(x64, t.double() if t.is_floating_point() else t, reduction="sum", **kw64)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch_loss_err, torch_grad_err = _errors(F.cross_entropy, x, t, kw, ref.item(), ref_grad)
    ours_loss_err, ours_grad_err = _errors(fused_loss.cross_entropy, x, t, kw, ref.item(), ref_grad)
    eps = torch.finfo(torch.float32).eps
    assert ours_grad_err <= 2 * torch_grad_err + eps, (ours_grad_err, torch_grad_err)
    assert ours_loss_err <= 2 * torch_loss_err + eps, (ours_loss_err, torch_loss_err)


def _masked_cases():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 4000, generator=gen)
    x[:, 0] = -1e9  # a masked class beside logits near 0
    y = torch.randint(1, 4000, (64,), generator=gen)
    tp = torch.softmax(torch.randn(64, 4000, generator=gen), 1)
    confident = torch.randn(64, 1000, generator=gen) * 3
    yc = torch.randint(0, 1000, (64,), generator=gen)
    confident[torch.arange(64), yc] += 40
    soft = torch.nn.functional.one_hot(yc, 1000) * (1 - 1e-4) + 1e-4 / 1000
    kd = lambda a: a.view(8, 8, -1).transpose(1, 2).contiguous()  # noqa: E731
    return {
        "smooth_row": (x, y, dict(label_smoothing=0.1)),
        "smooth_kdim": (kd(x), y.view(8, 8), dict(label_smoothing=0.1)),
        "prob_row": (x, tp, {}),
        "prob_kdim": (kd(x), kd(tp), {}),
        "prob_confident": (confident, soft.float(), {}),
    }


@pytest.mark.parametrize("name", list(_masked_cases()))
def test_loss_value_does_not_cancel_with_a_far_logit(name):
    """Linear sums kept relative to each block's max and compensated: no cancellation against a
    masked logit (-1e9) or a confident one (+40), whichever column holds it."""
    x, t, kw = _masked_cases()[name]
    ref = F.cross_entropy(x.double(), t.double() if t.is_floating_point() else t, **kw).item()
    err_torch = abs(F.cross_entropy(x, t, **kw).item() - ref) / abs(ref)
    err_ours = abs(fused_loss.cross_entropy(x, t, **kw).item() - ref) / abs(ref)
    assert err_ours <= 2 * err_torch + torch.finfo(torch.float32).eps, (err_ours, err_torch)


def _float16_cases(scale):
    """Each loss on float16 input whose per-element losses are about `scale` (400 of them)."""
    x = torch.full((400,), scale, dtype=torch.float16)
    rows = torch.zeros(400, 3, dtype=torch.float16)
    rows[:, 0] = -scale
    probs = torch.zeros(400, 3, dtype=torch.float16)
    probs[:, 0] = 1
    target = torch.zeros(400, dtype=torch.long)
    return {
        "cross_entropy": (rows, target, {}),
        "cross_entropy_kdim": (rows.view(200, 2, 3).transpose(1, 2), target.view(200, 2), {}),
        "cross_entropy_probs": (rows, probs, {}),
        "binary_cross_entropy_with_logits": (-x, torch.ones_like(x), {}),
        "smooth_l1_loss": (x, torch.zeros_like(x), {}),
        "huber_loss": (x, torch.zeros_like(x), {}),
        "sigmoid_focal_loss": (-x, torch.ones_like(x), dict(alpha=0.9)),
    }


@pytest.mark.parametrize("name", list(_float16_cases(1.0)))
def test_float16_sum_past_its_range_is_inf_and_mean_is_not(name):
    """A float16 'sum' past 65504 is inf, as torch's (the float32 total rounded to the result's
    dtype, not refused by a checked conversion). The 'mean' of the same values is finite and
    float64's to float16's precision; torch's cross-entropy 'mean' on the CPU is inf there (it sums
    in float16 before dividing: README, "Where torch itself is inconsistent")."""
    from fused_loss import reference
    base = name.replace("_kdim", "").replace("_probs", "")
    x, t, kw = _float16_cases(1000.0)[name]
    for reduction in ("sum", "mean"):
        ours = getattr(fused_loss, base)(x, t, reduction=reduction, **kw)
        theirs = getattr(reference, base)(x, t, reduction=reduction, **kw)
        exact = getattr(reference, base)(x.double(), t.double() if t.is_floating_point() else t,
                                         reduction=reduction, **kw)
        assert ours.dtype == theirs.dtype == torch.float16
        if reduction == "sum":
            assert ours.isinf() and theirs.isinf(), (ours, theirs)
        else:
            torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)
