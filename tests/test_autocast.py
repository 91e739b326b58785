"""Under torch.autocast torch computes these losses in float32 (its fp32 policy: 16-bit arguments
cast to float32) and returns a float32 loss; fused_loss returns the same dtype, values and
gradients (cross-entropy's (N, C) kernel without a float32 copy of the logits: its loss comes
unrounded from the kernel). CPU autocast, bfloat16 and float16."""
import pytest
import torch
import torch.nn.functional as F

import fused_loss
from helpers import assert_close_to_torch, float64_reference

HALF = [torch.bfloat16, torch.float16]


def _data(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(12, 10, generator=g) * 3).to(dtype)
    y = torch.randint(0, 10, (12,), generator=g)
    y[::5] = -100
    t = torch.rand(12, 10, generator=g).to(dtype)
    w = (torch.rand(10, generator=g) + 0.5).to(dtype)
    return x, y, t, w


def _cases(x, y, t, w, float32=torch.float32):
    """float32: the dtype of the float32 weight (float64 in the float64 reference)."""
    k = x.view(3, 4, 10).transpose(1, 2)  # (N, C, d)
    return {
        "ce": (lambda f, x: f.cross_entropy(x, y, weight=w, label_smoothing=0.1), x),
        "ce none": (lambda f, x: f.cross_entropy(x, y, reduction="none"), x),
        "ce float32 weight": (lambda f, x: f.cross_entropy(x, y, weight=w.to(float32), reduction="sum"), x),
        "ce (N, C, d)": (lambda f, x: f.cross_entropy(x, y.view(3, 4)), k),
        "ce probabilities": (lambda f, x: f.cross_entropy(x, t, label_smoothing=0.05), x),
        "bce": (lambda f, x: f.binary_cross_entropy_with_logits(x, t, pos_weight=w), x),
        "bce none": (lambda f, x: f.binary_cross_entropy_with_logits(x, t, reduction="none"), x),
        "smooth_l1": (lambda f, x: f.smooth_l1_loss(x, t, beta=0.5), x),
        "huber": (lambda f, x: f.huber_loss(x, t, reduction="sum"), x),
    }


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(_cases(*_data(torch.float32))))
def test_autocast_dtype_value_and_gradient_as_torch(case, dtype):
    fn, x = _cases(*_data(dtype))[case]
    results = []
    for module in (F, fused_loss):
        leaf = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = fn(module, leaf)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        results.append((loss, grad))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert got_grad.dtype == want_grad.dtype == dtype
    assert_close_to_torch(got, want, float64_reference(_float64_loss, case, *_data(dtype)), "loss",
                          tol=dict(atol=1e-6, rtol=1e-5))
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-3)


def _float64_loss(case, x, y, t, w):
    """torch's loss of the case on float64 arguments (no autocast): the reference of its float32 loss."""
    fn, x = _cases(x, y, t, w, float32=torch.float64)[case]
    return fn(F, x)


def test_autocast_off_for_the_device_keeps_the_input_dtype():
    x, y, _, _ = _data(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        assert fused_loss.cross_entropy(x, y).dtype == torch.bfloat16  # CPU tensors: CPU autocast is off
    assert fused_loss.cross_entropy(x, y).dtype == torch.bfloat16


def test_autocast_under_compile():
    x, y, _, w = _data(torch.bfloat16)
    x.requires_grad_()

    @torch.compile(fullgraph=True)
    def fn(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_loss.cross_entropy(x, y, weight=w)

    loss = fn(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(x, y, weight=w)
    assert loss.dtype == torch.float32
    # torch.testing.assert_close's float32 default, kept
    assert_close_to_torch(loss, want, float64_reference(F.cross_entropy, x, y, weight=w), "loss",
                          tol=dict(atol=1e-5, rtol=1.3e-6))
