"""fused_loss.patch() / unpatch(): torch.nn.functional and torch's loss modules routed through
fused_loss, falling back to torch for what it does not support, and restored exactly."""
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_loss
from fused_loss import patching
from helpers import assert_close_to_torch, float64_reference

ORIGINALS = {name: getattr(F, name) for name in patching.PATCHABLE}


@pytest.fixture(autouse=True)
def _restore():
    yield
    fused_loss.unpatch()
    for name, fn in ORIGINALS.items():
        assert getattr(F, name) is fn


def _fused(t):
    return t.grad_fn is not None and "fused_loss" in type(t.grad_fn).__name__


def _calls(seed=0):
    """(name, call through torch.nn.functional, call through a torch.nn module built before any patch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (6,), generator=g)
    t = torch.rand(6, 11, generator=g, dtype=torch.float64)
    h = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=3)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.rand(11, generator=g, dtype=torch.float64))
    sl1 = torch.nn.SmoothL1Loss(reduction="sum", beta=0.5)
    hub = torch.nn.HuberLoss(delta=0.7)
    calls = [
        ("cross_entropy", lambda: F.cross_entropy(x, y, label_smoothing=0.2), lambda: ce(x, y), (x,)),
        ("binary_cross_entropy_with_logits", lambda: F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
         lambda: bce(x, t), (x,)),
        ("smooth_l1_loss", lambda: F.smooth_l1_loss(x, t, beta=0.3), lambda: sl1(x, t), (x,)),
        ("huber_loss", lambda: F.huber_loss(x, t, delta=2.0), lambda: hub(x, t), (x,)),
    ]
    if hasattr(F, "linear_cross_entropy"):
        lce = torch.nn.LinearCrossEntropyLoss(7, 11, dtype=torch.float64)
        lce.linear.weight.data.copy_(w.detach())
        calls.append(("linear_cross_entropy", lambda: F.linear_cross_entropy(h, w, y, label_smoothing=0.1),
                      lambda: lce(h, y), (h, w, lce.linear.weight)))
    return calls


@pytest.mark.parametrize("which", ["functional", "module"])
def test_patched_calls_run_fused_and_equal_torch(which):
    for name, functional_call, module_call, wrt in _calls():
        call = functional_call if which == "functional" else module_call
        expected = call()
        expected_grads = torch.autograd.grad(expected, wrt, allow_unused=True)
        assert not _fused(expected), name
        with fused_loss.patch():
            got = call()
        assert _fused(got), f"{name} did not run fused_loss's op under patch()"
        torch.testing.assert_close(got, expected)
        for g, e in zip(torch.autograd.grad(got, wrt, allow_unused=True), expected_grads):
            torch.testing.assert_close(g, e)


def test_unpatch_restores_the_same_objects():
    fused_loss.patch()
    assert fused_loss.is_patched()
    for name in patching.PATCHABLE:
        assert getattr(F, name) is not ORIGINALS[name]
        assert fused_loss.is_patched(name)
    fused_loss.patch()  # a second patch does not stack wrappers
    assert getattr(F.cross_entropy, patching._ORIGINAL_ATTR) is ORIGINALS["cross_entropy"]
    fused_loss.unpatch()
    assert not fused_loss.is_patched()
    for name, fn in ORIGINALS.items():
        assert getattr(F, name) is fn
    fused_loss.unpatch()  # unpatching twice is harmless
    assert F.cross_entropy is ORIGINALS["cross_entropy"]


def test_context_manager_and_nesting():
    with fused_loss.patch(cross_entropy=False) as outer:
        assert not fused_loss.is_patched("cross_entropy") and fused_loss.is_patched("huber_loss")
        assert "cross_entropy" not in outer.replaced
        with fused_loss.patch() as inner:
            assert fused_loss.is_patched("cross_entropy")
            assert set(inner.replaced) == {"cross_entropy"}
        # leaving the inner block undoes only what it did
        assert not fused_loss.is_patched("cross_entropy") and fused_loss.is_patched("huber_loss")
    assert not fused_loss.is_patched()
    for name, fn in ORIGINALS.items():
        assert getattr(F, name) is fn


def test_context_manager_restores_on_error():
    with pytest.raises(KeyError):
        with fused_loss.patch():
            raise KeyError("boom")
    assert not fused_loss.is_patched()


def test_wrapper_looks_like_torch():
    with fused_loss.patch():
        for name in patching.PATCHABLE:
            fn = getattr(F, name)
            assert fn.__name__ == name and fn.__doc__ == ORIGINALS[name].__doc__
            assert inspect.signature(fn) == inspect.signature(ORIGINALS[name])
    with pytest.raises(ValueError, match="fused_loss.is_patched"):
        fused_loss.is_patched("mse_loss")


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclass_goes_to_torch():
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    sub = torch.Tensor._make_subclass(_Subclass, x.detach(), True)
    expected = ORIGINALS["cross_entropy"](sub, y)
    with fused_loss.patch():
        got = F.cross_entropy(sub, y)
    assert not _fused(got)
    torch.testing.assert_close(got, expected)


def test_torch_func_transforms_go_to_torch():
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    expected = torch.func.grad(lambda z: ORIGINALS["cross_entropy"](z, y, label_smoothing=0.1))(x)
    with fused_loss.patch():
        got = torch.func.grad(lambda z: F.cross_entropy(z, y, label_smoothing=0.1))(x)
        hess = torch.func.hessian(lambda z: F.smooth_l1_loss(z, torch.zeros_like(z), beta=10.0))(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hess.reshape(20, 20), torch.eye(20, dtype=torch.float64) / 200)


def test_device_without_kernels_goes_to_torch(monkeypatch):
    monkeypatch.setattr(patching.ops, "KERNELS", frozenset())
    x = torch.randn(4, 5, requires_grad=True)
    with fused_loss.patch():
        got = F.smooth_l1_loss(x, torch.zeros(4, 5))
    assert not _fused(got)
    torch.testing.assert_close(got, ORIGINALS["smooth_l1_loss"](x, torch.zeros(4, 5)))


@pytest.mark.parametrize("call", [
    lambda: F.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 7])),          # target out of range
    lambda: F.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2], dtype=torch.int32)),  # target dtype
    lambda: F.cross_entropy(torch.randn(3, 5, dtype=torch.complex64), torch.tensor([0, 1, 2])),
    lambda: F.binary_cross_entropy_with_logits(torch.randn(3, 5), torch.rand(3, 4)),
    lambda: F.smooth_l1_loss(torch.randn(3), torch.randn(3), reduction="average"),
    lambda: F.huber_loss(torch.randn(3), torch.randn(3), delta=-1.0),
])
def test_bad_calls_raise_torchs_error(call):
    with pytest.raises(Exception) as torch_error:
        call()
    with fused_loss.patch(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad call is not a fallback: no warning, torch's error
        with pytest.raises(type(torch_error.value)) as patched_error:
            call()
    assert str(patched_error.value) == str(torch_error.value)


def test_fused_failure_falls_back_to_torch_with_a_warning(monkeypatch):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("fused_loss.smooth_l1_loss: not this one")

    monkeypatch.setitem(patching._TARGETS, "smooth_l1_loss", (unsupported, "fused_loss::smooth_l1_loss_forward"))
    x, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    with fused_loss.patch():
        with pytest.warns(UserWarning, match="fell back to torch.*not this one"):
            got = F.smooth_l1_loss(x, t)
    torch.testing.assert_close(got, ORIGINALS["smooth_l1_loss"](x, t))


def test_compiled_code_runs_the_fused_ops():
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(6, 9, requires_grad=True)
    y = torch.randint(0, 9, (6,))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, y):
        return criterion(x, y) + F.huber_loss(x, x.detach() * 0.5, delta=0.5)

    expected = step(x, y)
    expected_grad, = torch.autograd.grad(expected, x)
    torch._dynamo.reset()
    with fused_loss.patch():
        got, code = run_and_get_code(torch.compile(step, fullgraph=True), x, y)
    torch._dynamo.reset()
    code = "\n".join(code)
    assert "fused_loss.cross_entropy_forward" in code and "fused_loss.huber_loss_forward" in code, code
    # torch.testing.assert_close's float32 default, kept; torch's float32 rounding by tests/helpers.py's rule
    tol = dict(atol=1e-5, rtol=1.3e-6)
    assert_close_to_torch(got, expected, float64_reference(step, x, y), "loss", tol=tol)
    grad64 = float64_reference(lambda x, y: torch.autograd.grad(step(x.requires_grad_(), y), x)[0], x, y)
    assert_close_to_torch(torch.autograd.grad(got, x)[0], expected_grad, grad64, "grad", tol=tol)
