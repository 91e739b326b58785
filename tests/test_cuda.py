"""The CUDA kernels (cross-entropy and the elementwise losses): CPU-vs-CUDA agreement of values and
gradients, bitwise determinism run to run, and a CUDA-graph capture of forward and backward. Skipped unless
a GPU is visible, the CUDA kernels were built, and (until they are verified) FUSED_LOSS_CUDA_UNVERIFIED=1
(scripts/cuda_check.sh compile-checks them on machines without a GPU)."""
import subprocess
import sys

import pytest
import torch

import fused_loss
from fused_loss import reference

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fused_loss::smooth_l1_loss_forward", "CUDA")
USED = ("fused_loss::smooth_l1_loss_forward", "cuda") in fused_loss.ops.KERNELS
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="no GPU visible, or fused_loss was built without its CUDA kernels"),
    pytest.mark.skipif(HAS_CUDA_KERNELS and not USED, reason="the CUDA kernels are not yet verified: run with "
                       "FUSED_LOSS_CUDA_UNVERIFIED=1 to test them (scripts/gpu_session.sh does)"),
]

DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-12), (torch.bfloat16, 1e-2, 1e-2),
          (torch.float16, 1e-3, 1e-3)]


def _losses():
    return {
        "bce": lambda x, t, **kw: fused_loss.binary_cross_entropy_with_logits(
            x, t, weight=kw.get("w"), pos_weight=kw.get("pw"), reduction=kw["reduction"]),
        "smooth_l1": lambda x, t, **kw: fused_loss.smooth_l1_loss(x, t, reduction=kw["reduction"], beta=0.5),
        "huber": lambda x, t, **kw: fused_loss.huber_loss(x, t, reduction=kw["reduction"], delta=0.7,
                                                          weight=kw.get("w_full")),
        "focal": lambda x, t, **kw: fused_loss.sigmoid_focal_loss(x, t, reduction=kw["reduction"]),
    }


def _case(dtype, shape=(37, 1029), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    pw = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    w_full = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, dict(w=w, pw=pw, w_full=w_full)


@pytest.mark.parametrize("name", list(_losses()))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_cuda_equals_cpu(name, reduction, dtype, rtol, atol):
    fn = _losses()[name]
    x, t, kw = _case(dtype)
    results = []
    for device in ("cpu", "cuda"):
        xd, td = x.to(device).requires_grad_(), t.to(device).requires_grad_()
        kwd = {k: v.to(device) for k, v in kw.items()}
        loss = fn(xd, td, reduction=reduction, **kwd)
        # 'sum' with an upstream of 1: the forward's in-pass gradient is the one handed out.
        up = (torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype) if loss.dim() else
              torch.tensor(1.0 if reduction == "sum" else 0.5, dtype=loss.dtype)).reshape(loss.shape).to(device)
        grads = torch.autograd.grad(loss, (xd, td), up)
        results.append([loss.cpu(), *[g.cpu() for g in grads]])
    for cpu, cuda in zip(*results):
        assert cuda.dtype == cpu.dtype and cuda.shape == cpu.shape
        torch.testing.assert_close(cuda, cpu, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(_losses()))
def test_bitwise_deterministic(name):
    """Two runs of forward and backward give the same bits (fixed-order reductions, no atomics)."""
    fn = _losses()[name]
    x, t, kw = _case(torch.float32, shape=(1024, 1031), seed=1)
    kw = {k: v.cuda() for k, v in kw.items()}
    outs = []
    for _ in range(2):
        xd = x.cuda().requires_grad_()
        loss = fn(xd, t.cuda(), reduction="mean", **kw)
        outs.append((loss.detach().clone(), torch.autograd.grad(loss, xd)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# bf16 upstreams: 1.001 rounds to 1 in bf16 and 0.1 to 0.10009765625, so an upstream read in the
# input's dtype would keep a stale buffer or scale wrongly; it is read as a double, as on the CPU.
@pytest.mark.parametrize("dtype, upstream", [(torch.float32, 1.0), (torch.float32, 0.5), (torch.bfloat16, 1.001),
                                             (torch.bfloat16, 0.1)], ids=str)
@pytest.mark.parametrize("name", ["binary_cross_entropy_with_logits", "smooth_l1_loss", "huber_loss",
                                  "sigmoid_focal_loss"])
def test_backward_into(name, dtype, upstream):
    """The forward's in-pass gradient is kept for an upstream gradient of exactly 1 (checked on the
    device) and recomputed otherwise: the bits of the backward op, which agrees with the CPU's."""
    x, t, kw = _case(dtype)
    x, t = x.cuda(), t.cuda()
    extra = {"binary_cross_entropy_with_logits": (kw["w"].cuda(), kw["pw"].cuda(), 1),
             "smooth_l1_loss": (1, 0.5), "huber_loss": (kw["w_full"].cuda(), 1, 0.7),
             "sigmoid_focal_loss": (1, 0.25, 2.0)}[name]
    ops = torch.ops.fused_loss
    fwd, bwd, into = (getattr(ops, f"{name}_{kind}") for kind in ("forward", "backward", "backward_into"))
    _, buffer = fwd(x, t, *extra, True)
    g = torch.tensor(upstream, device="cuda")
    want = bwd(g, x, t, *extra, True, False)[0]
    assert torch.equal(buffer, want) == (upstream == 1.0)  # the in-pass gradient has the backward's bits
    buffer.fill_(7.0)  # a sentinel: kept for an upstream of 1 (decided on the device), overwritten otherwise
    into(buffer, g, x, t, *extra)
    assert torch.equal(buffer, torch.full_like(buffer, 7.0) if upstream == 1.0 else want)
    cpu_extra = tuple(e.cpu() if torch.is_tensor(e) else e for e in extra)
    on_cpu = bwd(torch.tensor(upstream, dtype=torch.float64), x.cpu(), t.cpu(), *cpu_extra, True, False)[0]
    torch.testing.assert_close(want.cpu(), on_cpu, **({} if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)))


def _capture_and_replay(step, x):
    """Captures step() (forward and backward into x.grad) in a CUDA graph after a warm-up outside
    it (as CUDA graphs require), zeroes x.grad, replays, and returns the captured loss."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return captured


def test_cuda_graph_capture_of_forward_and_backward():
    x = torch.randn(4096, 513, device="cuda", requires_grad=True)
    t = torch.rand(4096, 513, device="cuda")
    pos_weight = torch.rand(513, device="cuda") + 0.5

    def step():
        loss = (fused_loss.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight)
                + fused_loss.smooth_l1_loss(x, t, beta=0.5) + fused_loss.huber_loss(x, t))
        loss.backward()
        return loss

    captured = _capture_and_replay(step, x)
    x_ref = x.detach().clone().requires_grad_()
    ref = (torch.nn.functional.binary_cross_entropy_with_logits(x_ref, t, pos_weight=pos_weight)
           + torch.nn.functional.smooth_l1_loss(x_ref, t, beta=0.5) + torch.nn.functional.huber_loss(x_ref, t))
    ref.backward()
    torch.testing.assert_close(captured, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_bad_input_on_cuda_raises():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="must match the size"):  # torch's broadcast error
        fused_loss.smooth_l1_loss(x, torch.randn(4, 6, device="cuda"))
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fused_loss.smooth_l1_loss_forward(x, torch.randn(4, 5), 1, 1.0, False)


# --- cross-entropy ------------------------------------------------------------------------------
# Shapes that take each layout of the CUDA kernels (csrc/cuda/cross_entropy/row_math.cuh): a thread
# per row (few classes; (N, C, d) input), a warp per row, a block per row; odd sizes, so that rows
# start unaligned and end in a tail.
CE_SHAPES = [(67, 11), (53, 1000), (9, 5003), (2, 33000), (5, 7, 3, 4)]


def _ce_case(shape, dtype, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    n, c = shape[0], shape[1]
    y = torch.randint(0, c, (n, *shape[2:]), generator=g)
    if ignore:
        y.view(-1)[::5] = -100
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    probs = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return x, y, w, probs


CE_OPTIONS = {
    "plain": {},
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "weighted smoothing": dict(weight=True, label_smoothing=0.2),
    "z_loss": dict(z_loss=1e-3),
    "softcap, temperature": dict(softcap=5.0, temperature=0.7),
    "all, with stats": dict(weight=True, label_smoothing=0.1, softcap=3.0, temperature=1.5, z_loss=1e-2,
                            return_stats=True),
}


def _run_ce(x, y, w, reduction, options, device, probs=None, upstream=0.5):
    """Loss (and stats) and the input's (and soft target's) gradient, on `device`, back on the CPU.
    upstream: the gradient of a scalar loss (1: the forward's in-pass gradient is the one handed out)."""
    kw = dict(options)
    kw["weight"] = w.to(device) if kw.pop("weight", False) else None
    xd = x.to(device).requires_grad_()
    target = y.to(device) if probs is None else probs.to(device).requires_grad_()
    out = fused_loss.cross_entropy(xd, target, reduction=reduction, **kw)
    loss, stats = out if kw.get("return_stats") else (out, None)
    up = (torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype) if loss.dim() else
          torch.tensor(upstream, dtype=loss.dtype)).reshape(loss.shape).to(device)
    wrt = (xd,) if probs is None else (xd, target)
    grads = torch.autograd.grad(loss, wrt, up)
    result = [loss.detach().cpu(), *[g.cpu() for g in grads]]
    if stats is not None:
        result += [v.cpu() for v in stats]
    return result


def _assert_all_close(cuda, cpu, rtol, atol):
    assert len(cuda) == len(cpu)
    for a, b in zip(cuda, cpu):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("option", list(CE_OPTIONS))
@pytest.mark.parametrize("reduction, upstream", [("none", None), ("mean", 1.0), ("mean", 0.5), ("sum", 1.0)])
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_cross_entropy_cuda_equals_cpu(shape, option, reduction, upstream, dtype, rtol, atol):
    x, y, w, _ = _ce_case(shape, dtype)
    results = [_run_ce(x, y, w, reduction, CE_OPTIONS[option], device, upstream=upstream)
               for device in ("cpu", "cuda")]
    _assert_all_close(results[1], results[0], rtol, atol)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("option", [{}, dict(weight=True, label_smoothing=0.15)], ids=["plain", "weight+smoothing"])
@pytest.mark.parametrize("reduction, upstream", [("none", None), ("mean", 1.0), ("sum", 0.5)])
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_cross_entropy_probability_targets_cuda_equals_cpu(shape, option, reduction, upstream, dtype, rtol, atol):
    x, y, w, probs = _ce_case(shape, dtype)
    results = [_run_ce(x, y, w, reduction, option, device, probs, upstream) for device in ("cpu", "cuda")]
    _assert_all_close(results[1], results[0], rtol, atol)


def test_cross_entropy_cuda_edge_rows():
    """Rows of -inf, +inf, NaN and an offset of 1e4; every target ignored ('mean': NaN); uint8 targets."""
    x = torch.randn(6, 40, dtype=torch.float64)
    x[0, :] = float("-inf")
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3] += 1e4
    x[4, :20] = float("-inf")
    y = torch.tensor([1, 2, 3, 4, 30, 0])
    for reduction in ("none", "sum"):
        results = [_run_ce(x, y, None, reduction, {}, device) for device in ("cpu", "cuda")]
        _assert_all_close(results[1], results[0], 1e-12, 1e-12)
    all_ignored = torch.full((6,), -100)
    results = [_run_ce(x[3:], all_ignored[3:], None, "mean", {}, device) for device in ("cpu", "cuda")]
    _assert_all_close(results[1], results[0], 1e-12, 1e-12)
    x8, y8 = torch.randn(33, 7), torch.randint(0, 7, (33,), dtype=torch.uint8)
    results = [_run_ce(x8, y8, None, "sum", {}, device) for device in ("cpu", "cuda")]
    _assert_all_close(results[1], results[0], 1e-5, 1e-6)


@pytest.mark.parametrize("shape", [(64, 50257), (1000, 300)], ids=str)
def test_cross_entropy_bitwise_deterministic(shape):
    x, y, w, _ = _ce_case(shape, torch.bfloat16, seed=2)
    options = dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=10.0)
    runs = [_run_ce(x, y, w, "mean", options, "cuda") for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_grad_in_place_equals_cpu(dtype):
    """The in-place forward of linear cross-entropy's chunks: loss in float32, logits overwritten."""
    x, y, w, _ = _ce_case((37, 3001), dtype)
    ops = torch.ops.fused_loss
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).clone()
        loss, stats = ops.cross_entropy_forward_grad_in_place(xd, y.to(device), w.to(device), 1, -100, 0.1, 4.0,
                                                              1.0, 1e-3, True)
        results.append([loss.cpu(), stats.cpu(), xd.cpu()])
    assert results[1][0].dtype == torch.float32
    _assert_all_close(results[1], results[0], *((1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)))


@pytest.mark.parametrize("upstream", [1.0, 0.75])
def test_cross_entropy_backward_into(upstream):
    """The forward's in-pass gradient is kept for an upstream gradient of exactly 1 (checked on the
    device) and recomputed otherwise: the same bits as the backward op."""
    x, y, w, _ = _ce_case((19, 2049), torch.float32)
    x, y, w = x.cuda(), y.cuda(), w.cuda()
    ops = torch.ops.fused_loss
    loss, stats, grad = ops.cross_entropy_forward(x, y, w, 1, -100, 0.1, True)
    g = torch.tensor(upstream, device="cuda")
    want = ops.cross_entropy_backward(g, x, y, w, stats, 1, -100, 0.1)
    assert torch.equal(grad, want) == (upstream == 1.0)  # the in-pass gradient has the backward's bits
    grad.fill_(7.0)  # a sentinel: kept for an upstream of 1 (decided on the device), overwritten otherwise
    ops.cross_entropy_backward_into(grad, g, x, y, w, stats, 1, -100, 0.1)
    assert torch.equal(grad, torch.full_like(grad, 7.0) if upstream == 1.0 else want)


@pytest.mark.parametrize("upstream", [1.0, 0.75])
def test_cross_entropy_probability_targets_backward_into(upstream):
    x, _, w, probs = _ce_case((21, 1500), torch.float32)
    x, w, probs = x.cuda(), w.cuda(), probs.cuda()
    ops = torch.ops.fused_loss
    _, stats, grad = ops.cross_entropy_prob_forward(x, probs, w, 1, 0.1, True)
    g = torch.tensor(upstream, device="cuda")
    want = ops.cross_entropy_prob_backward(g, x, probs, w, stats, 1, 0.1, True, False)[0]
    assert torch.equal(grad, want) == (upstream == 1.0)
    grad.fill_(7.0)  # a sentinel: kept for an upstream of 1, overwritten otherwise
    ops.cross_entropy_prob_backward_into(grad, g, x, probs, w, stats, 1, 0.1)
    assert torch.equal(grad, torch.full_like(grad, 7.0) if upstream == 1.0 else want)


def test_cross_entropy_cuda_graph_capture():
    """Forward and backward of every option capture in a CUDA graph (no host synchronisation)."""
    x0, y, w, _ = _ce_case((512, 4099), torch.float32, seed=3)
    x = x0.cuda().requires_grad_()
    y, w = y.cuda(), w.cuda()
    options = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=8.0)

    def step():
        loss = fused_loss.cross_entropy(x, y, **options)
        loss.backward()
        return loss

    captured = _capture_and_replay(step, x)
    x_ref = x0.cuda().requires_grad_()
    ref = reference.cross_entropy_with_options(x_ref, y, w, -100, "mean", 0.1, 8.0, 1.0, 1e-3)
    ref.backward()
    torch.testing.assert_close(captured, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_cross_entropy_compile_reduce_overhead():
    x = torch.randn(256, 1031, device="cuda", requires_grad=True)
    y = torch.randint(0, 1031, (256,), device="cuda")
    fn = torch.compile(lambda x, y: fused_loss.cross_entropy(x, y, label_smoothing=0.1), mode="reduce-overhead")
    for _ in range(3):
        loss = fn(x, y)
        (gx,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x_ref, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, torch.autograd.grad(ref, x_ref)[0])


def test_cross_entropy_target_out_of_bounds_fails_on_the_device():
    """A target out of range fails a device assertion that names fused_loss (torch's CUDA behaviour:
    checked without a host synchronisation); never a read out of bounds. In a subprocess: the
    assertion leaves the CUDA context unusable."""
    code = ("import torch, fused_loss\n"
            "x = torch.randn(4, 10, device='cuda')\n"
            "loss = fused_loss.cross_entropy(x, torch.tensor([1, 2, 10, 3], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "fused_loss.cross_entropy: a target is out of bounds" in run.stderr + run.stdout


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 2e-2, 2e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_cuda_equals_cpu(dtype, reduction, rtol, atol):
    """linear_cross_entropy's chunks on CUDA go through the CUDA in-place forward (several chunks)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(300, 64, generator=g).to(dtype)
    w = (torch.randn(1001, 64, generator=g) * 0.1).to(dtype)
    b = (torch.randn(1001, generator=g) * 0.1).to(dtype)
    y = torch.randint(0, 1001, (300,), generator=g)
    y[::7] = -100
    results = []
    for device in ("cpu", "cuda"):
        hd, wd, bd = (t.to(device).requires_grad_() for t in (h, w, b))
        loss = fused_loss.linear_cross_entropy(hd, wd, y.to(device), linear_bias=bd, reduction=reduction,
                                               label_smoothing=0.1, z_loss=1e-3, softcap=20.0, chunk_size=128)
        up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape).to(device)
        grads = torch.autograd.grad(loss, (hd, wd, bd), up)
        results.append([loss.detach().cpu(), *[t.cpu() for t in grads]])
    _assert_all_close(results[1], results[0], rtol, atol)


def test_float16_sum_past_its_range_is_inf_on_cuda():
    """As on the CPU (tests/test_precision.py): a float16 'sum' past 65504 is inf, its 'mean' finite."""
    from test_precision import _float16_cases
    for name, (x, t, kw) in _float16_cases(1000.0).items():
        fn = getattr(fused_loss, name.replace("_kdim", "").replace("_probs", ""))
        for reduction in ("sum", "mean"):
            cpu = fn(x, t, reduction=reduction, **kw)
            cuda = fn(x.cuda(), t.cuda(), reduction=reduction, **kw).cpu()
            assert cuda.dtype == torch.float16 and bool(cuda.isinf()) == (reduction == "sum"), (name, reduction, cuda)
            torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=0)
